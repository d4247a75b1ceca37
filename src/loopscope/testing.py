"""Keep blocking calls out of async code in tests: :func:`detect_blocking` records every
step that blocked an event loop for longer than a limit, with the stack of the line that
blocked it; :func:`assert_no_blocking` fails when there was one.  The pytest plugin
(``--loopscope-max-block`` and ``@pytest.mark.loopscope(max_block=...)``) is built on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from . import _installation

__all__ = ["Block", "BlockingRecorder", "assert_no_blocking", "detect_blocking", "format_blocks"]


@dataclass(frozen=True)
class Block:
    """One step that blocked a loop.  ``duration`` is in seconds."""

    loop: str
    duration: float
    what: str
    location: str | None
    blocking_stack: list[str] = field(default_factory=list)


@dataclass
class BlockingRecorder:
    """The blocks seen while :func:`detect_blocking` was active."""

    max_block: float
    blocks: list[Block] = field(default_factory=list)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") != "slow_callback" or event.get("duration", 0.0) < self.max_block:
            return
        task = event.get("task")
        what = f"task {task!r} ({event.get('coro')})" if task else str(event.get("callback"))
        self.blocks.append(
            Block(
                loop=str(event.get("loop")),
                duration=float(event["duration"]),
                what=what,
                location=event.get("location"),
                blocking_stack=list(event.get("blocking_stack") or []),
            )
        )


def format_blocks(blocks: list[Block], max_block: float) -> str:
    """A readable report: one paragraph per block with its stack."""
    lines = [f"event loop blocked longer than {max_block:g} s ({len(blocks)} time(s)):"]
    for block in blocks:
        lines.append(
            f"- {block.duration:.3f} s on loop {block.loop!r} in {block.what}, "
            f"at {block.location or 'an unknown location'}"
        )
        lines.extend(f"      {entry}" for entry in block.blocking_stack)
    return "\n".join(lines)


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
            slow_threshold=max_block, registry=CollectorRegistry(), slow_events=False
        )
    elif installation.options.slow_threshold > max_block:
        raise ValueError(
            f"loopscope is already installed with slow_threshold="
            f"{installation.options.slow_threshold:g}, above max_block={max_block:g}"
        )
    installation.events.add_listener(recorder)
    try:
        yield recorder
    finally:
        installation.events.remove_listener(recorder)
        if owned and _installation.current() is installation:
            _installation.uninstall()


@contextmanager
def assert_no_blocking(max_block: float = 0.1) -> Iterator[BlockingRecorder]:
    """Raise AssertionError, with the blocking stacks, if a loop blocked for ``max_block``
    seconds or more inside the ``with`` block."""
    with detect_blocking(max_block) as recorder:
        yield recorder
    if recorder.blocks:
        raise AssertionError(format_blocks(recorder.blocks, max_block))
