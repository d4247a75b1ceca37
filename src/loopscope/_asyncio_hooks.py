"""Hooks for asyncio's own loops (``BaseEventLoop`` and its subclasses).

Callbacks are timed by the handles themselves: the loop's ``_call_soon`` and ``call_at``
produce per-loop subclasses of ``asyncio.Handle`` and ``asyncio.TimerHandle`` whose
``_run`` reads the clock around the original.  The subclasses keep the class names, the
callback and every slot, so ``repr()``, ``cancel()``, ``when()`` and asyncio's own error
messages are unchanged.  Busy time is measured around the selector's ``select()``.
"""

from __future__ import annotations

import selectors
from asyncio import AbstractEventLoop, TimerHandle, events
from collections.abc import Callable
from typing import Any

from ._probe import LoopProbe

__all__ = ["AsyncioProbe", "TimedSelector"]

_handle_run = events.Handle._run
_timer_class = events.TimerHandle


class TimedSelector:
    """Wraps a loop's selector so the time the loop waits for I/O can be subtracted."""

    def __init__(self, selector: selectors.BaseSelector, probe: LoopProbe) -> None:
        self.wrapped = selector
        self.probe = probe

    def select(self, timeout: float | None = None) -> Any:
        probe = self.probe
        clock = probe.clock
        before = clock()
        mark = probe.busy_mark
        if mark is not None:
            probe.stats.busy_seconds += before - mark
        try:
            return self.wrapped.select(timeout)
        finally:
            probe.busy_mark = clock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def _timed_handle_classes(probe: LoopProbe) -> tuple[type[events.Handle], type[TimerHandle]]:
    """Handle classes bound to one probe (a class attribute costs less than a slot)."""

    class Handle(events.Handle):
        __slots__ = ("_loopscope_ready",)
        _loopscope_probe = probe

        def _run(self) -> None:
            clock = probe.clock
            start = clock()
            _handle_run(self)
            handle: Any = self
            try:
                probe.after_step(handle._callback, handle._loopscope_ready, start, clock())
            except Exception as exc:
                probe.fault(exc)

    class TimerHandle(events.TimerHandle):
        __slots__ = ()
        _loopscope_probe = probe

        def _run(self) -> None:
            clock = probe.clock
            start = clock()
            _handle_run(self)
            handle: Any = self
            try:
                probe.after_step(handle._callback, handle._when, start, clock())
            except Exception as exc:
                probe.fault(exc)

    Handle.__qualname__ = events.Handle.__qualname__
    TimerHandle.__qualname__ = events.TimerHandle.__qualname__
    return Handle, TimerHandle


class AsyncioProbe(LoopProbe):
    """Probe for asyncio's loops."""

    implementation = "asyncio"

    def install_hooks(self, loop: AbstractEventLoop) -> None:
        handle_class, timer_class = _timed_handle_classes(self)
        clock = self.clock
        base: Any = loop
        ready = base._ready
        orig_call_at = loop.call_at
        self.raw_call_at = orig_call_at

        # call_soon and call_soon_threadsafe both end in _call_soon.
        def _call_soon(callback: Callable[..., object], args: Any, context: Any) -> Any:
            handle: Any = handle_class(callback, args, loop, context)
            handle._loopscope_ready = clock()
            if handle._source_traceback:
                del handle._source_traceback[-1]
            ready.append(handle)
            return handle

        def call_at(when: float, callback: Any, *args: Any, context: Any = None) -> Any:
            timer = orig_call_at(when, callback, *args, context=context)
            if timer.__class__ is _timer_class:
                timer.__class__ = timer_class
            return timer

        self.patch(loop, "_call_soon", _call_soon)
        self.patch(loop, "call_at", call_at)
        self.patch_lifecycle(loop)

    def wrap_selector(self, loop: AbstractEventLoop) -> None:
        """Measure busy time around ``select()``; done when the loop starts running because
        subclasses (and asyncio's own test loops) set ``_selector`` after ``__init__``."""
        base: Any = loop
        selector = getattr(base, "_selector", None)
        if selector is None or isinstance(selector, TimedSelector):
            return
        base._selector = TimedSelector(selector, self)

    def unwrap_selector(self, loop: AbstractEventLoop) -> None:
        base: Any = loop
        selector = getattr(base, "_selector", None)
        if isinstance(selector, TimedSelector):
            base._selector = selector.wrapped

    def on_run_start(self, loop: AbstractEventLoop) -> None:
        self.wrap_selector(loop)
        super().on_run_start(loop)

    def remove_hooks(self, loop: AbstractEventLoop) -> None:
        self.unwrap_selector(loop)
        super().remove_hooks(loop)

    def schedule_raw(
        self, loop: AbstractEventLoop, delay: float, callback: Callable[[], None]
    ) -> TimerHandle:
        # The class's call_at, not the instance's: loopscope's timer is not measured.
        return self.raw_call_at(loop.time() + delay, callback)
