"""Differential tests of the hot path's two twins: the C accelerator (``loopscope._speedups``)
and the pure-Python package (``loopscope._pure``).

Each scenario runs once per twin in this one process (a loop's probe takes its parts from
``_hotpath.twin`` when the loop is made, so the twin is selected before the loop is made),
on asyncio's loop and on uvloop.  Each run's figures (``LoopStats``, read through the probe
after a flush, or through the registry) and its events (structlog, durations and stacks
left out) are compared between the twins, and each run is also held to the figures the
scenario must give, so that both twins being wrong in the same way fails too.

The C half of a scenario is skipped only when ``loopscope._speedups`` cannot be imported;
the C twin is taken from ``importlib`` rather than from ``_hotpath.twin``, so the
comparison runs under ``LOOPSCOPE_PURE_PYTHON=1`` as well.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import loopscope
from loopscope import _hotpath
from loopscope._probe import LoopProbe
from loopscope._stats import BUCKETS, LoopStats

from .conftest import loop_class, make_loop, patched_names

T = TypeVar("T")

TWINS = ("c", "pure")
LABEL = "twin"
STEPS = "asyncio_loop_task_steps_total"


# --- selecting a twin -------------------------------------------------------------------


def twin_module(name: str) -> ModuleType | None:
    """The twin called ``name``; None for the C one when it cannot be imported."""
    if name == "pure":
        return _hotpath.pure
    try:
        return importlib.import_module("loopscope._speedups")
    except ImportError:
        return None


@pytest.fixture(name="twin", params=TWINS)
def fixture_twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """One twin per param, selected for loops made in the test (the C one is skipped only
    when it cannot be imported)."""
    module = twin_module(str(request.param))
    if module is None:
        pytest.skip("loopscope._speedups cannot be imported: the C twin is not built")
    monkeypatch.setattr(_hotpath, "twin", module)
    return module


def on_each_twin(monkeypatch: pytest.MonkeyPatch, scenario: Callable[[], T]) -> dict[str, T]:
    """``scenario()`` run once with each twin selected (uninstalled after each run)."""
    results: dict[str, T] = {}
    failures: list[str] = []
    for name in TWINS:
        module = twin_module(name)
        if module is None:
            continue
        monkeypatch.setattr(_hotpath, "twin", module)
        try:
            results[name] = scenario()
        except AssertionError as exc:  # run the other twin too: one twin or both?
            failures.append(f"[{name} twin] {exc}")
        finally:
            loopscope.uninstall()
    if failures:
        raise AssertionError("\n".join(failures))
    return results


def same_on_both(results: dict[str, T]) -> T:
    """The one result both twins gave (asserted equal); the C half skipped only when the C
    twin cannot be imported (after the pure half's own assertions passed)."""
    if "c" not in results:
        pytest.skip("loopscope._speedups cannot be imported: the C half was skipped")
    assert results["c"] == results["pure"], "the twins differ (left: C, right: pure)"
    return results["pure"]


# --- figures and events -----------------------------------------------------------------


def bucket_above(bound: float) -> int:
    """Index of the first histogram slot whose observations are all above ``bound``."""
    return BUCKETS.index(bound) + 1


@dataclass(frozen=True)
class Figures:
    """The deterministic part of a LoopStats (durations are wall-clock: left out)."""

    callbacks: int
    delays: int
    task_steps: int
    tasks_created: int
    slow_callbacks: int
    slow_locations: tuple[tuple[str, int], ...]
    #: Callbacks that ran longer than 25 ms, and schedule delays over 25 ms (lower
    #: bounds the scenarios force by blocking; no upper bound on speed is assumed).
    callbacks_over_25ms: int = 0
    delays_over_25ms: int = 0
    callbacks_over_250ms: int = 0

    @classmethod
    def of(cls, stats: LoopStats) -> Figures:
        over_25 = bucket_above(0.025)
        over_250 = bucket_above(0.25)
        return cls(
            callbacks=sum(stats.callback_duration.counts),
            delays=sum(stats.schedule_delay.counts),
            task_steps=stats.task_steps,
            tasks_created=stats.tasks_created,
            slow_callbacks=stats.slow_callbacks,
            slow_locations=tuple(sorted(stats.slow_locations.items())),
            callbacks_over_25ms=sum(stats.callback_duration.counts[over_25:]),
            delays_over_25ms=sum(stats.schedule_delay.counts[over_25:]),
            callbacks_over_250ms=sum(stats.callback_duration.counts[over_250:]),
        )

    def counts(self) -> tuple[int, int, int, int, int, tuple[tuple[str, int], ...]]:
        """What must be equal between the twins (the rest depends on the clock)."""
        return (
            self.callbacks,
            self.delays,
            self.task_steps,
            self.tasks_created,
            self.slow_callbacks,
            self.slow_locations,
        )

    def __sub__(self, other: Figures) -> Figures:
        return Figures(
            self.callbacks - other.callbacks,
            self.delays - other.delays,
            self.task_steps - other.task_steps,
            self.tasks_created - other.tasks_created,
            self.slow_callbacks - other.slow_callbacks,
            tuple(sorted(set(self.slow_locations) - set(other.slow_locations))),
            self.callbacks_over_25ms - other.callbacks_over_25ms,
            self.delays_over_25ms - other.delays_over_25ms,
            self.callbacks_over_250ms - other.callbacks_over_250ms,
        )


def snapshot(probe: LoopProbe) -> Figures:
    """The probe's figures now (the C recorder's folded in first)."""
    probe.recorder.flush(probe.stats)
    return Figures.of(probe.stats)


_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_TIMING_FIELDS = ("duration", "blocked_for", "blocking_stack", "timestamp", "started")


def normalised(event: dict[str, Any]) -> dict[str, Any]:
    """An event without what differs from run to run: durations, stacks, addresses."""
    out: dict[str, Any] = {}
    for key, value in event.items():
        if key in _TIMING_FIELDS:
            continue
        out[key] = _ADDRESS.sub("0x?", value) if isinstance(value, str) else value
    return out


def step_events(logs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The slow_callback and loop_blocked events of a capture."""
    return [dict(e) for e in logs if e.get("event") in ("slow_callback", "loop_blocked")]


@dataclass
class Session:
    """One install() and one loop of the kind under test, with the loop's probe."""

    module: ModuleType
    registry: CollectorRegistry
    loop: asyncio.AbstractEventLoop
    probe: LoopProbe
    extra: dict[str, Any] = field(default_factory=dict)

    def steps_in_registry(self) -> float:
        return self.registry.get_sample_value(STEPS, {"loop": LABEL}) or 0.0


def start(loop_kind: str, **options: Any) -> Session:
    """install() on a fresh registry and make one loop; its probe is the selected twin's."""
    registry = CollectorRegistry()
    installation = loopscope.install(registry=registry, loop_name=LABEL, **options)
    loop = make_loop(loop_kind)
    probe = installation.probe_for(loop)
    assert probe is not None
    module = _hotpath.twin
    assert type(probe.recorder) is module.Recorder  # the twin selected is the one in use
    return Session(module, registry, loop, probe)


def run_scenario(
    loop_kind: str,
    main: Callable[[Session], Any],
    **options: Any,
) -> tuple[Session, list[dict[str, Any]]]:
    """Run ``main(session)`` (a coroutine) to completion on a new instrumented loop."""
    session = start(loop_kind, **options)
    try:
        with capture_logs() as logs:
            session.loop.run_until_complete(main(session))
        session.extra["final"] = snapshot(session.probe)
        session.extra["registry_steps"] = session.steps_in_registry()
    finally:
        session.loop.close()
    return session, [dict(e) for e in logs]


# --- task steps ---------------------------------------------------------------------------


TASKS, AWAITS = 5, 40


def test_task_steps(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """M tasks awaiting sleep(0) N times: M * (N + 1) steps, and main()'s two."""

    async def worker() -> None:
        for _ in range(AWAITS):
            await asyncio.sleep(0)

    async def main(session: Session) -> None:
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(worker()) for _ in range(TASKS)]
        await asyncio.gather(*tasks)

    def scenario() -> tuple[tuple[Any, ...], float, list[dict[str, Any]]]:
        session, logs = run_scenario(loop_kind, main)
        final: Figures = session.extra["final"]
        assert final.task_steps == TASKS * (AWAITS + 1) + 2
        assert final.tasks_created == TASKS + 1  # and main() itself
        assert session.extra["registry_steps"] == final.task_steps
        assert final.delays == final.callbacks  # every one was scheduled, none was I/O
        assert final.callbacks >= final.task_steps
        assert final.slow_callbacks == 0
        return final.counts(), session.extra["registry_steps"], step_events(logs)

    same_on_both(on_each_twin(monkeypatch, scenario))


# --- plain callbacks, timers, threads, I/O -------------------------------------------------


CALLBACKS = 30
BLOCK = 0.03  # blocks the loop so that what waits meanwhile has a delay over 25 ms


def test_call_soon(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """N call_soon callbacks: N more callbacks and schedule delays, in order; each waited
    while the step that scheduled them blocked, so each delay is over 25 ms."""

    async def main(session: Session) -> None:
        loop = asyncio.get_running_loop()
        ran: list[int] = session.extra.setdefault("ran", [])
        before = snapshot(session.probe)
        for i in range(CALLBACKS):
            loop.call_soon(ran.append, i)
        time.sleep(BLOCK)
        await asyncio.sleep(0)  # resumes after the N callbacks
        session.extra["delta"] = snapshot(session.probe) - before

    def scenario() -> tuple[tuple[Any, ...], list[int]]:
        session, _ = run_scenario(loop_kind, main)
        delta: Figures = session.extra["delta"]
        assert session.extra["ran"] == list(range(CALLBACKS))
        # the step that scheduled them, and them
        assert delta.callbacks == CALLBACKS + 1
        assert delta.delays == CALLBACKS + 1
        assert delta.task_steps == 1
        assert delta.callbacks_over_25ms >= 1  # the blocking step
        assert CALLBACKS <= delta.delays_over_25ms <= CALLBACKS + 1
        return delta.counts(), session.extra["ran"]

    same_on_both(on_each_twin(monkeypatch, scenario))


def test_timers(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """call_later (positive, zero and negative delays) and call_at (future and past): each
    runs once and is counted once, with its lateness (over 25 ms here) as its delay."""

    async def main(session: Session) -> None:
        loop = asyncio.get_running_loop()
        ran: list[str] = session.extra.setdefault("ran", [])
        before = snapshot(session.probe)
        loop.call_later(0.001, ran.append, "later")
        loop.call_later(0, ran.append, "later-0")
        loop.call_later(-1, ran.append, "later-negative")
        loop.call_at(loop.time() + 0.001, ran.append, "at")
        loop.call_at(loop.time() - 1, ran.append, "at-past")
        time.sleep(BLOCK)
        await asyncio.sleep(0.01)  # one more timer: the sleep's own
        session.extra["delta"] = snapshot(session.probe) - before

    def scenario() -> tuple[tuple[Any, ...], list[str]]:
        session, _ = run_scenario(loop_kind, main)
        delta: Figures = session.extra["delta"]
        assert sorted(session.extra["ran"]) == sorted(
            ["later", "later-0", "later-negative", "at", "at-past"]
        )
        # the step that scheduled them, the five timers and the sleep's timer
        assert delta.callbacks == 7
        assert delta.delays == 7
        assert delta.task_steps == 1
        assert 5 <= delta.delays_over_25ms <= 6
        return delta.counts(), sorted(session.extra["ran"])

    same_on_both(on_each_twin(monkeypatch, scenario))


def test_call_soon_threadsafe(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """N call_soon_threadsafe from another thread: N more scheduled callbacks, in order
    (the self-pipe reads that wake asyncio's loop are I/O: callbacks without a delay)."""

    async def main(session: Session) -> None:
        loop = asyncio.get_running_loop()
        ran: list[int] = session.extra.setdefault("ran", [])
        done = loop.create_future()

        def hit(i: int) -> None:
            ran.append(i)
            if len(ran) == CALLBACKS:
                done.set_result(None)

        def feed() -> None:
            for i in range(CALLBACKS):
                loop.call_soon_threadsafe(hit, i)

        before = snapshot(session.probe)
        thread = threading.Thread(target=feed)
        thread.start()
        await done
        session.extra["delta"] = snapshot(session.probe) - before
        thread.join()

    def scenario() -> tuple[tuple[Any, ...], list[int]]:
        session, _ = run_scenario(loop_kind, main)
        delta: Figures = session.extra["delta"]
        assert session.extra["ran"] == list(range(CALLBACKS))
        # the step that started the thread, and the N callbacks
        assert delta.delays == CALLBACKS + 1
        assert delta.task_steps == 1
        if loop_kind == "uvloop":  # wakes through libuv, no Python I/O callback
            assert delta.callbacks == CALLBACKS + 1
        else:
            assert delta.callbacks >= CALLBACKS + 1
        # how many self-pipe reads there were depends on the thread's timing
        return (delta.delays, delta.task_steps), session.extra["ran"]

    same_on_both(on_each_twin(monkeypatch, scenario))


ROUNDS = 10


def test_add_reader(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socketpair's reader callback (add_reader): one I/O callback per message, counted
    as a callback without a schedule delay and not as a task step."""

    async def main(session: Session) -> None:
        loop = asyncio.get_running_loop()
        here, there = socket.socketpair()
        here.setblocking(False)
        got: list[bytes] = session.extra.setdefault("got", [])
        waiter: list[asyncio.Future[None]] = []

        def readable() -> None:
            got.append(here.recv(4096))
            if waiter and not waiter[0].done():
                waiter[0].set_result(None)

        loop.add_reader(here.fileno(), readable)
        try:
            before = snapshot(session.probe)
            for i in range(ROUNDS):
                waiter[:] = [loop.create_future()]
                there.send(b"%d;" % i)
                await waiter[0]
            session.extra["delta"] = snapshot(session.probe) - before
        finally:
            loop.remove_reader(here.fileno())
            here.close()
            there.close()

    def scenario() -> tuple[tuple[Any, ...], list[bytes]]:
        session, _ = run_scenario(loop_kind, main)
        delta: Figures = session.extra["delta"]
        assert session.extra["got"] == [b"%d;" % i for i in range(ROUNDS)]
        # per round: the reader (I/O, no delay) and the step it woke
        assert delta.callbacks == 2 * ROUNDS
        assert delta.delays == ROUNDS
        assert delta.task_steps == ROUNDS
        return delta.counts(), session.extra["got"]

    same_on_both(on_each_twin(monkeypatch, scenario))


def test_tcp_echo(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TCP echo (start_server/open_connection; on uvloop through protocol methods):
    both ends' reads are I/O callbacks, counted the same by both twins."""

    async def main(session: Session) -> None:
        handled = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(100):
                    writer.write(data)
                    await writer.drain()
                writer.close()
                await writer.wait_closed()
            finally:
                handled.set_result(None)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        echoed: list[bytes] = session.extra.setdefault("echoed", [])
        before = snapshot(session.probe)
        for i in range(ROUNDS):
            writer.write(b"%04d" % i)
            echoed.append(await reader.readexactly(4))
        session.extra["delta"] = snapshot(session.probe) - before
        writer.close()
        await writer.wait_closed()
        await handled
        server.close()
        await server.wait_closed()

    def scenario() -> tuple[tuple[Any, ...], list[bytes]]:
        session, _ = run_scenario(loop_kind, main)
        delta: Figures = session.extra["delta"]
        assert session.extra["echoed"] == [b"%04d" % i for i in range(ROUNDS)]
        # per round at least: the server's read and the client's read (I/O callbacks),
        # and the two tasks' steps they woke
        assert delta.callbacks - delta.delays >= 2 * ROUNDS
        assert delta.task_steps >= 2 * ROUNDS
        assert delta.slow_callbacks == 0
        return delta.counts(), session.extra["echoed"]

    same_on_both(on_each_twin(monkeypatch, scenario))


# --- callbacks that return or raise ---------------------------------------------------------


def _raiser(outcome: str) -> tuple[Callable[[], None], BaseException | None]:
    """A callback with the given outcome, and the exception object it raises."""
    error: BaseException | None = {
        "returns": None,
        "Exception": ValueError("boom"),
        "CancelledError": asyncio.CancelledError("cancelled in a callback"),
        "KeyboardInterrupt": KeyboardInterrupt("interrupted in a callback"),
        "SystemExit": SystemExit(3),
    }[outcome]

    def callback_under_test() -> None:
        if error is not None:
            raise error

    return callback_under_test, error


def _handler_view(context: dict[str, Any], error: BaseException | None) -> dict[str, Any]:
    """What the loop's exception handler got, comparable from run to run."""
    view: dict[str, Any] = {}
    for key, value in context.items():
        if key == "exception":
            view[key] = (type(value).__name__, value is error)
        elif key == "handle":
            view[key] = _ADDRESS.sub("0x?", repr(value))
        else:
            view[key] = _ADDRESS.sub("0x?", str(value))
    return view


def _run_callback(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None], error: BaseException | None
) -> list[dict[str, Any]]:
    caught: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: caught.append(context))

    async def main() -> None:
        asyncio.get_running_loop().call_soon(callback)
        await asyncio.sleep(0)

    loop.run_until_complete(main())
    return [_handler_view(context, error) for context in caught]


@pytest.mark.parametrize("outcome", ["returns", "Exception", "CancelledError"])
def test_callback_outcomes(loop_kind: str, outcome: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A callback that returns or raises: the loop's exception handler gets what it gets
    without loopscope (the same exception object; the handle's repr names the callback),
    and the callback is counted as run."""
    callback, error = _raiser(outcome)
    plain = make_loop(loop_kind)  # not instrumented: what the application gets without
    try:
        expected = _run_callback(plain, callback, error)
    finally:
        plain.close()
    assert len(expected) == (0 if error is None else 1)
    if error is not None:
        assert expected[0]["exception"] == (type(error).__name__, True)
        assert "callback_under_test" in expected[0]["handle"]

    def scenario() -> tuple[tuple[Any, ...], list[dict[str, Any]]]:
        session = start(loop_kind)
        try:
            before = snapshot(session.probe)
            got = _run_callback(session.loop, callback, error)
            delta = snapshot(session.probe) - before
        finally:
            session.loop.close()
        # what the handler gets is what it gets without loopscope; the handle's repr names
        # the callback (on uvloop it is the repr of a Handle of loopscope's wrapper, whose
        # repr is the callback's: "<Handle <function ...>>" where plain uvloop shows
        # "<Handle qualname>", the same on both twins)
        assert [{**c, "handle": None} for c in got] == [{**c, "handle": None} for c in expected]
        assert all("callback_under_test" in c["handle"] for c in got)
        if loop_kind == "asyncio":
            assert got == expected
        # main()'s two steps, the callback, and run_until_complete's done callback
        assert delta.task_steps == 2
        assert delta.tasks_created == 1
        assert delta.callbacks == delta.delays == 4
        assert session.probe.recorder.current_start == 0.0
        assert session.probe.recorder.current_callback is None
        return delta.counts(), got

    same_on_both(on_each_twin(monkeypatch, scenario))


@pytest.mark.parametrize("outcome", ["KeyboardInterrupt", "SystemExit"])
def test_interrupting_callback(loop_kind: str, outcome: str, twin: ModuleType) -> None:
    """KeyboardInterrupt and SystemExit from a callback propagate out of
    run_until_complete as without loopscope; the step is over for the watchdog afterwards
    (markers cleared), so a loop that then sits idle, and then runs again, is never
    reported as blocked (the bug this guards: a marker left set after the interrupt).

    Parametrised over the twins (the idle wait takes most of a second per run): each is
    held to the same absolute figures and to no event at all."""
    callback, error = _raiser(outcome)
    assert error is not None

    async def main() -> None:
        asyncio.get_running_loop().call_soon(callback)
        await asyncio.sleep(0.05)

    loopscope.uninstall()
    plain = make_loop(loop_kind)  # what the application gets without loopscope
    try:
        with pytest.raises(type(error)) as raised:
            plain.run_until_complete(main())
        assert raised.value is error
    finally:
        plain.close()

    session = start(loop_kind, slow_threshold=0.1)
    assert session.module is twin
    recorder = session.probe.recorder
    try:
        with capture_logs() as logs:
            with pytest.raises(type(error)) as raised:
                session.loop.run_until_complete(main())
            assert raised.value is error
            assert recorder.current_start == 0.0
            assert recorder.current_callback is None
            interrupted = snapshot(session.probe)
            time.sleep(0.5)  # idle, not running: not blocked
            session.loop.run_until_complete(asyncio.sleep(0.3))
        final = snapshot(session.probe)
    finally:
        session.loop.close()
    assert step_events(logs) == [], "an idle loop was reported as blocked or slow"
    # main()'s first step; the interrupting callback is recorded on uvloop (the wrapper
    # records in its finally) and not on asyncio's loop (TimedRun stops at the
    # interrupt) -- on both twins alike
    interrupting = 1 if loop_kind == "uvloop" else 0
    assert interrupted.task_steps == 1
    assert interrupted.callbacks == interrupted.delays == 1 + interrupting
    # then main()'s last step (its sleep ended during the second run) and the sleep(0.3)
    # task's two
    assert final.task_steps == 4
    assert final.tasks_created == 2
    assert final.slow_callbacks == 0
    assert final.callbacks == final.delays


# --- cancelled handles --------------------------------------------------------------------


def test_cancelled_handles(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled handles and timers are not run and not counted; a handle or timer that
    cancels itself while it runs ran, and is counted once."""

    async def main(session: Session) -> None:
        loop = asyncio.get_running_loop()
        ran: list[str] = session.extra.setdefault("ran", [])
        before = snapshot(session.probe)
        loop.call_soon(ran.append, "soon").cancel()
        loop.call_later(0.001, ran.append, "later").cancel()
        loop.call_at(loop.time() + 0.001, ran.append, "at").cancel()
        mine: list[asyncio.Handle] = []

        def cancels_itself(name: str, index: int) -> None:
            ran.append(name)
            mine[index].cancel()

        mine.append(loop.call_soon(cancels_itself, "soon-self", 0))
        mine.append(loop.call_later(0.001, cancels_itself, "later-self", 1))
        await asyncio.sleep(0.02)  # its timer: one more callback
        session.extra["delta"] = snapshot(session.probe) - before
        session.extra["cancelled"] = [handle.cancelled() for handle in mine]

    def scenario() -> tuple[tuple[Any, ...], list[str]]:
        session, _ = run_scenario(loop_kind, main)
        delta: Figures = session.extra["delta"]
        assert sorted(session.extra["ran"]) == ["later-self", "soon-self"]
        assert session.extra["cancelled"] == [True, True]
        # the step, the two that cancelled themselves, and the sleep's timer
        assert delta.callbacks == delta.delays == 4
        assert delta.task_steps == 1
        return delta.counts(), sorted(session.extra["ran"])

    same_on_both(on_each_twin(monkeypatch, scenario))


# --- slow and blocked steps ----------------------------------------------------------------


def _block_for(seconds: float) -> None:
    time.sleep(seconds)  # <- the blocking line


BLOCKING_LINE = _block_for.__code__.co_firstlineno + 1
BLOCKING_LOCATION = f"test_twin_behaviour.py:{BLOCKING_LINE} in _block_for"


async def _blocker(seconds: float) -> None:
    _block_for(seconds)


async def _block_in_a_task(session: Session) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_task(_blocker(session.extra["block"]), name="blocker")


def _distinct(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The normalised events, each once, in the order first seen."""
    out: list[dict[str, Any]] = []
    for event in map(normalised, events):
        if event not in out:
            out.append(event)
    return out


def _check_step_event(event: dict[str, Any]) -> None:
    assert event["loop"] == LABEL
    assert event["threshold"] == 0.1
    assert event["task"] == "blocker"
    assert event["coro"] == "_blocker"
    assert str(event["location"]).endswith(BLOCKING_LOCATION), event["location"]
    stack = event["blocking_stack"]
    assert isinstance(stack, list) and stack, "the watchdog sampled no stack"
    assert any("_block_for" in line for line in stack)


def _slow_run(loop_kind: str, block: float) -> tuple[Session, list[dict[str, Any]], LoopStats]:
    session = start(loop_kind, slow_threshold=0.1, loop_blocked_after=0.1)
    session.extra["block"] = block
    try:
        with capture_logs() as logs:
            session.loop.run_until_complete(_block_in_a_task(session))
        snapshot(session.probe)
        stats = session.probe.stats.copy()
    finally:
        session.loop.close()
    return session, step_events(logs), stats


def test_slow_step(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step blocking 0.25 s (threshold 0.1): one slow_callback event, with the location
    of the blocking line and the stack the watchdog sampled; counted as one slow step."""

    def scenario() -> tuple[tuple[Any, ...], list[dict[str, Any]]]:
        _, events, stats = _slow_run(loop_kind, 0.25)
        slow = [e for e in events if e["event"] == "slow_callback"]
        assert len(slow) == 1
        _check_step_event(slow[0])
        assert slow[0]["duration"] >= 0.24
        for event in events:
            _check_step_event(event)
        figures = Figures.of(stats)
        assert figures.slow_callbacks == 1
        assert figures.slow_locations == ((slow[0]["location"], 1),)
        assert figures.callbacks_over_25ms >= 1 and figures.callbacks_over_250ms <= 1
        assert stats.blocked_seconds >= 0.24
        assert figures.task_steps == 3  # main()'s two, the blocker's one
        assert figures.tasks_created == 2
        return figures.counts(), _distinct(slow)

    same_on_both(on_each_twin(monkeypatch, scenario))


def _cancels_itself_and_blocks(mine: list[asyncio.Handle | asyncio.TimerHandle]) -> None:
    mine[0].cancel()
    time.sleep(0.15)


@pytest.mark.parametrize("scheduled", ["call_soon", "call_later"])
def test_slow_callback_that_cancels_itself(
    loop_kind: str, scheduled: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow callback that cancels its own handle while it runs (which clears the
    handle's callback on asyncio's loop) is named in its slow_callback event and counted
    by its location, as any other."""

    async def main(session: Session) -> None:
        loop = asyncio.get_running_loop()
        mine: list[asyncio.Handle | asyncio.TimerHandle] = []
        if scheduled == "call_soon":
            mine.append(loop.call_soon(_cancels_itself_and_blocks, mine))
        else:
            mine.append(loop.call_later(0.001, _cancels_itself_and_blocks, mine))
        await asyncio.sleep(0.3)
        session.extra["cancelled"] = mine[0].cancelled()

    def scenario() -> tuple[tuple[Any, ...], list[dict[str, Any]]]:
        session, logs = run_scenario(loop_kind, main, slow_threshold=0.1)
        assert session.extra["cancelled"] is True
        slow = [e for e in step_events(logs) if e["event"] == "slow_callback"]
        assert len(slow) == 1, slow
        assert slow[0]["kind"] == "callback"
        assert "_cancels_itself_and_blocks" in str(slow[0]["callback"]), slow[0]
        assert str(slow[0]["location"]).endswith("in _cancels_itself_and_blocks"), slow[0]
        figures: Figures = session.extra["final"]
        assert figures.slow_callbacks == 1
        assert figures.slow_locations == ((slow[0]["location"], 1),)
        return figures.counts(), _distinct(slow)

    same_on_both(on_each_twin(monkeypatch, scenario))


def test_blocked_step(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step blocking 0.45 s (threshold 0.1): loop_blocked events while it lasts (at 0.1,
    0.2 and 0.4 s, give or take the watchdog's wake-ups), then its slow_callback."""

    def scenario() -> tuple[tuple[Any, ...], list[dict[str, Any]]]:
        _, events, stats = _slow_run(loop_kind, 0.45)
        blocked = [e for e in events if e["event"] == "loop_blocked"]
        slow = [e for e in events if e["event"] == "slow_callback"]
        assert len(blocked) >= 2
        assert len(slow) == 1 and events[-1] is slow[0]
        for event in events:
            _check_step_event(event)
        times = [e["blocked_for"] for e in blocked]
        assert times == sorted(times) and times[0] >= 0.1
        assert slow[0]["duration"] >= 0.44
        figures = Figures.of(stats)
        assert figures.slow_callbacks == 1
        assert stats.blocked_seconds >= 0.44
        return figures.counts(), _distinct(events)

    same_on_both(on_each_twin(monkeypatch, scenario))


# --- fork ---------------------------------------------------------------------------------


async def _steps(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _in_child(session: Session, write_end: int) -> None:
    """The forked child: 1000 more awaits on the loop inherited; report the registry's
    task steps before and after.  Never returns."""
    code = 1
    try:
        before = session.steps_in_registry()
        session.loop.run_until_complete(_steps(1000))
        after = session.steps_in_registry()
        os.write(write_end, f"{before!r} {after!r}".encode())
        code = 0
    finally:
        os._exit(code)


def _read_all(read_end: int, pid: int, timeout: float = 20.0) -> bytes:
    import select

    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
            os.kill(pid, 9)
            raise AssertionError("the forked child did not answer")
        chunk = os.read(read_end, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("shared", [False, True], ids=["no_dir", "multiprocess_dir"])
def test_fork_child_counts_its_own_steps(
    loop_kind: str, shared: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop alive at fork time ran 100 awaits in the parent; 1000 more in the child add
    exactly the child's steps to the child's registry: 1001 (the 1000 awaits and the
    task's last step), not 0 (the child's figures lost) nor 1101 (the parent's counted
    again) -- with and without multiprocess_dir."""
    runs = iter(range(len(TWINS)))

    def scenario() -> tuple[float, float]:
        options: dict[str, Any] = {}
        if shared:
            directory = tmp_path / f"run{next(runs)}"
            directory.mkdir()
            options["multiprocess_dir"] = str(directory)
        session = start(loop_kind, **options)
        try:
            session.loop.run_until_complete(_steps(100))
            in_parent = session.steps_in_registry()
            assert in_parent == 101
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                _in_child(session, write_end)
            os.close(write_end)
            try:
                answer = _read_all(read_end, pid)
            finally:
                os.close(read_end)
                _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, answer
            before, after = (float(x) for x in answer.split())
            if not shared:  # the parent's own figures are untouched by the child
                assert session.steps_in_registry() == in_parent
        finally:
            session.loop.close()
        assert after - before == 1001, f"the child counted {after - before:+} task steps"
        return before if not shared else 0.0, after - before

    same_on_both(on_each_twin(monkeypatch, scenario))


# --- uninstall ----------------------------------------------------------------------------


def test_uninstall_restores_the_loop(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After uninstall() the loop's methods are its own again, callbacks, timers, I/O and
    tasks still run, and nothing more is recorded."""
    loopscope.uninstall()
    plain = make_loop(loop_kind)
    own = set(vars(plain))
    plain.close()

    async def work() -> list[str]:
        loop = asyncio.get_running_loop()
        ran: list[str] = []
        here, there = socket.socketpair()
        readable = loop.create_future()
        loop.add_reader(here.fileno(), lambda: readable.set_result(here.recv(10)))
        loop.call_soon(ran.append, "soon")
        loop.call_later(0.001, ran.append, "later")
        threading.Thread(target=lambda: loop.call_soon_threadsafe(ran.append, "thread")).start()
        there.send(b"io")
        ran.append((await readable).decode())
        loop.remove_reader(here.fileno())
        here.close()
        there.close()
        await loop.create_task(_steps(10))
        await asyncio.sleep(0.01)
        return sorted(ran)

    def scenario() -> tuple[tuple[Any, ...], list[str]]:
        session = start(loop_kind)
        loop, probe = session.loop, session.probe
        try:
            assert loop.run_until_complete(work()) == ["io", "later", "soon", "thread"]
            hooked = patched_names(loop, loop_kind) - own
            name = "call_soon" if loop_kind == "uvloop" else "_call_soon"
            assert name in hooked and "create_task" in hooked
            measured = snapshot(probe)
            assert measured.task_steps == 4 + 11  # work()'s four steps, _steps(10)'s 11
            loopscope.uninstall()
            assert set(vars(loop)) == own, "loopscope left attributes on the loop"
            assert type(loop) is loop_class(loop_kind), "loopscope left its class on the loop"
            assert "call_soon" not in vars(loop) and "_call_soon" not in vars(loop)
            assert "create_task" not in vars(loop) and "call_at" not in vars(loop)
            if loop_kind == "asyncio":
                assert type(loop.call_soon(print)).__module__ == "asyncio.events"
                base: Any = loop
                assert type(base._selector).__module__ == "selectors"
                assert type(base._selector._selector).__module__ == "select"
            before = snapshot(probe)
            assert loop.run_until_complete(work()) == ["io", "later", "soon", "thread"]
            after = snapshot(probe)
        finally:
            loop.close()
        # (on asyncio's loop the self-pipe's reader handle, registered while installed,
        # keeps its timed class: each wake-up by call_soon_threadsafe is still recorded)
        assert after == before, f"recorded after uninstall(): {after - before}"
        return measured.counts(), sorted(hooked)

    same_on_both(on_each_twin(monkeypatch, scenario))
