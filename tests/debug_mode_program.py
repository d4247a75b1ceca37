"""A program that makes asyncio's (or uvloop's) debug mode speak, for tests/test_debug_mode.py.

``python debug_mode_program.py plain|loopscope LOOP...`` runs every case on a fresh debug
loop of each kind and prints one transcript: what each case prints and every log record
and warning, in order.  ``loopscope`` installs loopscope first (its own events off, so that
only what asyncio or uvloop say is printed) and names the hot path on standard error;
nothing else differs between the two modes, so every line number of this file is the same
in both transcripts.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import re
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

#: Above the loops' slow_callback_duration, set to SLOW_CALLBACK_DURATION.
BLOCK = 0.05
SLOW_CALLBACK_DURATION = 0.02

transcript: list[str] = []
#: What a case leaves to be collected once its loop is closed.
left_behind: list[Any] = []
#: The steps that block on purpose, as debug mode names them: it reports these, whatever the
#: machine's load; a report of any other step would be the load's.
BLOCKING = re.compile(
    r"Executing <(?:(?:Timer)?Handle (?:when=\S+ )?(?:slow_callback|Service\.slow_method|<Service>"
    r"|functools\.partial\(<function slow_callback)"
    r"|Task finished name='[^']*' coro=<slow_step\(\))"
)


class Transcribe(logging.Handler):
    """Every log record, formatted with its traceback, onto the transcript."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing ") and not BLOCKING.match(message):
            return
        transcript.append(self.format(record))


def show_warning(message: Any, category: Any, *_args: Any, **_kwargs: Any) -> None:
    transcript.append(f"warning {category.__name__}: {message}")


def say(*parts: object) -> None:
    transcript.append(" ".join(str(part) for part in parts))


def frames(stack: Any) -> str:
    """A source traceback, one line a frame (as the default exception handler prints them,
    without the source lines, and without folding repeated lines)."""
    if not stack:
        return repr(stack)
    return "\n".join(f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in stack)


def make_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


# --- the application's callbacks -----------------------------------------------------------


def slow_callback(*args: object) -> None:
    time.sleep(BLOCK)


def raising_callback(*args: object) -> None:
    raise ValueError("raised by a callback", args)


class Service:
    def slow_method(self) -> None:
        time.sleep(BLOCK)

    def __call__(self) -> None:
        time.sleep(BLOCK)

    def __repr__(self) -> str:
        return "<Service>"


def quiet(*args: object) -> None:
    pass


async def slow_step() -> None:
    await asyncio.sleep(0)
    time.sleep(BLOCK)


async def failing_task() -> None:
    await asyncio.sleep(0)
    raise ValueError("never retrieved")


async def pending_forever() -> None:
    await asyncio.get_running_loop().create_future()


async def never_awaited() -> None:
    pass


# --- the cases -----------------------------------------------------------------------------


async def settle(loop: asyncio.AbstractEventLoop) -> None:
    """Let what the case scheduled run (timers included)."""
    done = loop.create_future()
    loop.call_later(BLOCK, done.set_result, None)
    await done
    for _ in range(3):
        await asyncio.sleep(0)


async def case_blocking_steps(loop: asyncio.AbstractEventLoop) -> None:
    await loop.create_task(slow_step())
    loop.call_soon(slow_callback)
    loop.call_soon(slow_callback, 1, "two")
    loop.call_soon(functools.partial(slow_callback, "partial"), 3)
    loop.call_soon(Service().slow_method)
    loop.call_soon(Service())
    await settle(loop)
    loop.call_later(0.001, slow_callback, "timer")
    await settle(loop)
    # Far enough ahead that uvloop, which takes a deadline already passed (to the
    # millisecond) as call_soon, makes a timer even on a busy machine
    loop.call_at(loop.time() + 0.01, Service().slow_method)
    await settle(loop)


async def case_raising_callbacks(loop: asyncio.AbstractEventLoop) -> None:
    loop.call_soon(raising_callback, "soon")
    loop.call_soon(functools.partial(raising_callback, "partial"))
    await settle(loop)
    loop.call_later(0.001, raising_callback, "later")
    await settle(loop)


async def case_exception_handler_context(loop: asyncio.AbstractEventLoop) -> None:
    def handler(_loop: Any, context: dict[str, Any]) -> None:
        say("context keys:", sorted(context))
        say("message:", context.get("message"))
        handle = context.get("handle")
        say("handle:", repr(handle), type(handle).__name__)
        say("handle is an asyncio.Handle:", isinstance(handle, asyncio.Handle))
        exc = context.get("exception")
        say("exception:", repr(exc))
        if exc is not None:
            say("exception traceback:")
            say("".join(traceback.format_tb(exc.__traceback__)).rstrip())
        say("source_traceback:")
        say(frames(context.get("source_traceback")))

    loop.set_exception_handler(handler)
    try:
        loop.call_soon(raising_callback, "soon")
        await settle(loop)
        loop.call_later(0.001, raising_callback, "later")
        await settle(loop)
    finally:
        loop.set_exception_handler(None)


async def case_readers(loop: asyncio.AbstractEventLoop) -> None:
    reading, writing = socket.socketpair()
    reading.setblocking(False)

    def on_readable() -> None:
        reading.recv(100)
        raise ValueError("raised by a reader")

    try:
        loop.add_reader(reading.fileno(), on_readable)
        writing.send(b"x")
        await settle(loop)
        loop.remove_reader(reading.fileno())
    finally:
        reading.close()
        writing.close()


async def case_tasks_left_behind(loop: asyncio.AbstractEventLoop) -> None:
    # Collected after the case (run() collects), outside any step: a collection can take
    # longer than slow_callback_duration.
    left_behind.append(loop.create_task(failing_task()))
    left_behind.append(loop.create_task(pending_forever()))
    await settle(loop)


async def case_handle_reprs(loop: asyncio.AbstractEventLoop) -> None:
    for debug in (True, False):
        loop.set_debug(debug)
        service = Service()
        handles = [
            loop.call_soon(quiet, 1),
            loop.call_soon(service.slow_method),
            loop.call_soon(functools.partial(quiet, "p")),
            loop.call_soon(service),
            loop.call_soon_threadsafe(quiet, 2),
            loop.call_later(10, quiet, 3),
            loop.call_at(loop.time() + 10, service.slow_method),
            loop.call_later(10, service),
        ]
        for handle in handles:
            say(f"debug={debug}", type(handle).__name__, repr(handle), str(handle))
            handle.cancel()
            say(f"debug={debug} cancelled", repr(handle))
        await asyncio.sleep(0)
    loop.set_debug(True)


def make_everything(loop: asyncio.AbstractEventLoop) -> list[tuple[str, Any]]:
    made: list[tuple[str, Any]] = [
        ("call_soon", loop.call_soon(quiet)),
        ("call_soon_threadsafe", loop.call_soon_threadsafe(quiet)),
        ("call_later", loop.call_later(10, quiet)),
        ("call_at", loop.call_at(loop.time() + 10, quiet)),
        ("create_task", loop.create_task(never_awaited())),
        ("create_future", loop.create_future()),
        # More arguments than loopscope's C interception takes: its fallback's stack
        ("call_soon with nine arguments", loop.call_soon(quiet, *range(9))),
        ("call_later with nine arguments", loop.call_later(10, quiet, *range(9))),
    ]
    from_thread: list[Any] = []
    thread = threading.Thread(target=lambda: from_thread.append(loop.call_soon_threadsafe(quiet)))
    thread.start()
    thread.join()
    made.append(("call_soon_threadsafe from a thread", from_thread[0]))
    return made


def nested(depth: int, loop: asyncio.AbstractEventLoop) -> list[tuple[str, Any]]:
    if depth:
        return nested(depth - 1, loop)
    return make_everything(loop)


async def case_source_tracebacks(loop: asyncio.AbstractEventLoop) -> None:
    # Shallow stacks (every frame kept), then deeper than debug mode keeps (10 frames).
    for depth in (0, 12):
        for name, made_object in nested(depth, loop):
            say(name, f"source traceback at depth {depth}:")
            say(frames(made_object._source_traceback))
            made_object.cancel()
        await settle(loop)


async def case_coroutine_origin(loop: asyncio.AbstractEventLoop) -> None:
    say("coroutine origin tracking depth:", sys.get_coroutine_origin_tracking_depth())
    left_behind.append(never_awaited())
    await settle(loop)


CASES: list[Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, None]]] = [
    case_blocking_steps,
    case_raising_callbacks,
    case_exception_handler_context,
    case_readers,
    case_tasks_left_behind,
    case_handle_reprs,
    case_source_tracebacks,
    case_coroutine_origin,
]


def run(kind: str) -> None:
    for case in CASES:
        say(f"=== {kind} {case.__name__}")
        loop = make_loop(kind)
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW_CALLBACK_DURATION
        try:
            loop.run_until_complete(case(loop))
        finally:
            loop.close()
        left_behind.clear()
        gc.collect()
    say(f"=== {kind} after the loops")
    say("coroutine origin tracking depth:", sys.get_coroutine_origin_tracking_depth())


def start(mode: str) -> None:
    handler = Transcribe()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.DEBUG)
    warnings.simplefilter("always")
    warnings.showwarning = show_warning
    if mode == "loopscope":
        import loopscope
        from loopscope import _hotpath

        loopscope.install(events="off", slow_threshold=SLOW_CALLBACK_DURATION)
        hot_path = "pure" if _hotpath.twin is _hotpath.pure else "c"
        sys.stderr.write(f"hot path: {hot_path}\n")


if __name__ == "__main__":
    # At the top level, so that the stacks debug mode keeps (10 frames) reach this file.
    start(sys.argv[1])
    for kind in sys.argv[2:]:
        run(kind)
    sys.stdout.write("\n".join(transcript) + "\n")
