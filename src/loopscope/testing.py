"""Keep blocking calls out of async code in tests: :func:`detect_blocking` records every
step that blocked an event loop for longer than a limit, with the stack of the line that
blocked it; :func:`assert_no_blocking` fails when there was one.  The pytest plugin
(``--loopscope-max-block``, the ``loopscope_max_block`` ini setting and
``@pytest.mark.loopscope(max_block=...)``) is built on them.

A report shows the frames of the application (and of the test); the frames of pytest,
pluggy, pytest-asyncio, the event loop, loopscope and the standard library are counted,
not shown, unless the full stack is asked for.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from . import _installation
from ._instrument import Instrument, SlowStep
from ._stacks import _PACKAGE_DIR, _entry_file, _is_library

__all__ = ["Block", "BlockingRecorder", "assert_no_blocking", "detect_blocking", "format_blocks"]


@dataclass(frozen=True)
class Block:
    """One step that blocked a loop.  ``duration`` is in seconds."""

    loop: str
    duration: float
    what: str
    location: str | None
    blocking_stack: list[str] = field(default_factory=list)


class BlockingRecorder(Instrument):
    """The blocks seen while :func:`detect_blocking` was active: an instrument that keeps
    every slow step of ``max_block`` seconds or more."""

    def __init__(self, max_block: float) -> None:
        self.max_block = max_block
        self.blocks: list[Block] = []

    def __repr__(self) -> str:
        return f"BlockingRecorder(max_block={self.max_block!r}, blocks={self.blocks!r})"

    def slow_step(self, event: SlowStep) -> None:
        if event.duration < self.max_block:
            return
        if event.kind == "task":
            what = f"task {event.task!r} ({event.coro})"
        else:
            what = str(event.callback)
        self.blocks.append(
            Block(
                loop=event.loop,
                duration=event.duration,
                what=what,
                location=event.location,
                blocking_stack=list(event.blocking_stack),
            )
        )


#: Test runners whose frames are not the application's, as (module, name shown).
_RUNNERS = (
    ("_pytest", "pytest"),
    ("pytest", "pytest"),
    ("pluggy", "pluggy"),
    ("pytest_asyncio", "pytest-asyncio"),
)


#: The owners of hidden frames, in the order a report names them.
_OWNERS = (
    "pytest",
    "pluggy",
    "pytest-asyncio",
    "asyncio",
    "uvloop",
    "loopscope",
    "the standard library",
)


@functools.cache
def _runner_prefixes() -> tuple[tuple[str, str], ...]:
    """``(path prefix, name)`` of each test runner that is installed (nothing imported)."""
    prefixes = []
    for module, name in _RUNNERS:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin:
            continue
        path = os.path.abspath(spec.origin)
        if spec.submodule_search_locations is not None:
            path = os.path.dirname(path) + os.sep
        prefixes.append((path, name))
    return tuple(prefixes)


@functools.cache
def _uvloop_prefix() -> str | None:
    try:
        spec = importlib.util.find_spec("uvloop")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return os.path.dirname(os.path.abspath(spec.origin)) + os.sep


@functools.lru_cache(maxsize=1024)
def _hidden_as(filename: str) -> str | None:
    """What a frame of ``filename`` belongs to when it is hidden; None for the
    application's frames (and the test's), which are shown."""
    if filename.startswith("<frozen"):
        return "the standard library"
    path = os.path.abspath(filename) if not filename.startswith("<") else filename
    for prefix, name in _runner_prefixes():
        if path.startswith(prefix):
            return name
    if not _is_library(filename):
        return None
    if path.startswith(_PACKAGE_DIR):
        return "loopscope"
    uvloop_prefix = _uvloop_prefix()
    if uvloop_prefix is not None and path.startswith(uvloop_prefix):
        return "uvloop"
    if f"{os.sep}asyncio{os.sep}" in path:
        return "asyncio"
    return "the standard library"


def _stack_lines(stack: list[str], full_stack: bool, hint: str) -> list[str]:
    if full_stack:
        return stack
    shown: list[str] = []
    hidden: dict[str, int] = {}
    for entry in stack:
        owner = _hidden_as(_entry_file(entry))
        if owner is None:
            shown.append(entry)
        else:
            hidden[owner] = hidden.get(owner, 0) + 1
    if not shown or not hidden:
        return stack  # nothing of the application's to show instead: all of it
    owners = sorted(hidden, key=_OWNERS.index)
    names = owners[0] if len(owners) == 1 else f"{', '.join(owners[:-1])} and {owners[-1]}"
    count = sum(hidden.values())
    frames = "frame" if count == 1 else "frames"
    return [*shown, f"({count} {frames} of {names} hidden; {hint})"]


def _format_blocks(blocks: list[Block], max_block: float, *, full_stack: bool, hint: str) -> str:
    lines = [f"event loop blocked for {max_block:g} s or longer ({len(blocks)} time(s)):"]
    for block in blocks:
        lines.append(
            f"- {block.duration:.3f} s on loop {block.loop!r} in {block.what}, "
            f"at {block.location or 'an unknown location'}"
        )
        stack = _stack_lines(block.blocking_stack, full_stack, hint)
        lines.extend(f"      {entry}" for entry in stack)
    return "\n".join(lines)


def format_blocks(blocks: list[Block], max_block: float, *, full_stack: bool = False) -> str:
    """A readable report: one paragraph per block with its stack.

    The stack shows the application's frames and the test's, and counts the others (of
    pytest, pluggy, pytest-asyncio, asyncio, uvloop, loopscope and the standard library);
    ``full_stack=True`` shows every frame.  A stack with no frame of the application's is
    shown whole.
    """
    return _format_blocks(
        blocks, max_block, full_stack=full_stack, hint="full_stack=True shows them"
    )


@contextmanager
def detect_blocking(max_block: float) -> Iterator[BlockingRecorder]:
    """Record every step that blocks a loop for ``max_block`` seconds or more.

    Installs loopscope (on a private registry, with no slow-step logging) unless it is
    already installed, in which case its slow threshold must be at most ``max_block``.
    """
    if not max_block > 0:
        raise ValueError(f"max_block must be a number of seconds > 0; got {max_block!r}")
    recorder = BlockingRecorder(max_block)
    installation = _installation.current()
    owned = installation is None
    if installation is None:
        installation = _installation.install(
            slow_threshold=max_block, registry=CollectorRegistry(), events="off"
        )
    elif installation.options.slow_threshold > max_block:
        raise ValueError(
            f"loopscope is already installed with slow_threshold="
            f"{installation.options.slow_threshold:g}, above max_block={max_block:g}: "
            f"install it with slow_threshold at most {max_block:g} (under loopscope run: "
            f"--slow-threshold {max_block:g} or LOOPSCOPE_SLOW_THRESHOLD={max_block:g})"
        )
    installation.add_instrument(recorder)
    try:
        yield recorder
    finally:
        installation.events.remove(recorder)
        if owned and _installation.current() is installation:
            _installation.uninstall()


@contextmanager
def assert_no_blocking(
    max_block: float = 0.1, *, full_stack: bool = False
) -> Iterator[BlockingRecorder]:
    """Raise AssertionError, with the blocking stacks, if a loop blocked for ``max_block``
    seconds or more inside the ``with`` block.  The stacks show the application's frames,
    every frame with ``full_stack=True`` (see :func:`format_blocks`)."""
    with detect_blocking(max_block) as recorder:
        yield recorder
    if recorder.blocks:
        raise AssertionError(
            _format_blocks(
                recorder.blocks,
                max_block,
                full_stack=full_stack,
                hint="assert_no_blocking(..., full_stack=True) shows them",
            )
        )
