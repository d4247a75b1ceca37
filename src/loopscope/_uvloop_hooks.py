"""Hooks for uvloop's loop.

uvloop's handles are Cython objects that cannot be subclassed, so the callback itself is
wrapped: :class:`TimedCallback` reads the clock around the user's callback and reports to
the probe.  Its ``repr()`` is the callback's, so uvloop's "Exception in callback ..."
messages still name the user's code, and exceptions pass through it unchanged.
uvloop has no selector to wrap: busy time is the sum of the measured callbacks.
"""

from __future__ import annotations

from asyncio import AbstractEventLoop, TimerHandle
from collections.abc import Callable
from typing import Any

from ._probe import LoopProbe

__all__ = ["TimedCallback", "UvloopProbe"]


class TimedCallback:
    """A callback that measures itself; created per scheduled call."""

    __slots__ = ("callback", "probe", "ready")

    def __init__(self, callback: Callable[..., object], probe: LoopProbe, ready: float) -> None:
        self.callback = callback
        self.probe = probe
        self.ready = ready

    def __call__(self, *args: Any) -> object:
        probe = self.probe
        clock = probe.clock
        start = clock()
        try:
            return self.callback(*args)
        finally:
            try:
                probe.after_step(self.callback, self.ready, start, clock())
            except Exception as exc:
                probe.fault(exc)

    def __repr__(self) -> str:
        return repr(self.callback)


class UvloopProbe(LoopProbe):
    """Probe for ``uvloop.Loop``."""

    implementation = "uvloop"
    busy_from_callbacks = True

    def install_hooks(self, loop: AbstractEventLoop) -> None:
        probe = self
        clock = self.clock
        loop_time = loop.time
        orig_call_soon = loop.call_soon
        orig_call_soon_threadsafe = loop.call_soon_threadsafe
        orig_call_later = loop.call_later
        self.raw_call_later = orig_call_later

        def call_soon(callback: Any, *args: Any, context: Any = None) -> Any:
            return orig_call_soon(TimedCallback(callback, probe, clock()), *args, context=context)

        def call_soon_threadsafe(callback: Any, *args: Any, context: Any = None) -> Any:
            return orig_call_soon_threadsafe(
                TimedCallback(callback, probe, clock()), *args, context=context
            )

        # uvloop's call_at calls self.call_later, so this covers both.
        def call_later(delay: float, callback: Any, *args: Any, context: Any = None) -> Any:
            wrapped = TimedCallback(callback, probe, loop_time() + max(delay, 0.0))
            return orig_call_later(delay, wrapped, *args, context=context)

        self.patch(loop, "call_soon", call_soon)
        self.patch(loop, "call_soon_threadsafe", call_soon_threadsafe)
        self.patch(loop, "call_later", call_later)
        self.patch_lifecycle(loop)

    def schedule_raw(
        self, loop: AbstractEventLoop, delay: float, callback: Callable[[], None]
    ) -> TimerHandle:
        return self.raw_call_later(delay, callback)
