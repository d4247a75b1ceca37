"""Hooks for asyncio's own loops (``BaseEventLoop`` and its subclasses).

Callbacks are timed by the handles themselves: the loop's ``_call_soon`` and ``call_at``
produce per-loop subclasses of ``asyncio.Handle`` and ``asyncio.TimerHandle`` whose
``_run`` reads the clock around the original, and the reader and writer handles that
``_add_reader``/``_add_writer`` register (the I/O callbacks: a transport's ``_read_ready``
calls ``Protocol.data_received``) are switched to a timed class too.  The subclasses keep
the class names, the callback and every slot, so ``repr()``, ``cancel()``, ``when()`` and
asyncio's own error messages are unchanged.  Busy time is measured around ``select()``.
"""

from __future__ import annotations

import contextlib
import selectors
from asyncio import AbstractEventLoop, TimerHandle, events
from collections.abc import Callable
from typing import Any

from . import _hotpath
from ._probe import LoopProbe

__all__ = ["AsyncioProbe", "TimedSelector"]

_handle_run = events.Handle._run
_handle_class = events.Handle
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


def _timed_handle_classes(
    probe: LoopProbe,
) -> tuple[type[events.Handle], type[TimerHandle], type[events.Handle]]:
    """Handle classes bound to one probe, whose ``_run`` is the hot path's ``TimedRun``
    (asyncio's ``Handle._run`` timed around, recorded in the probe's recorder)."""

    class Handle(events.Handle):
        __slots__ = ("_loopscope_ready",)

    class TimerHandle(events.TimerHandle):
        __slots__ = ()

    class IOHandle(events.Handle):
        __slots__ = ()

    classes: Any = (Handle, TimerHandle, IOHandle)
    for cls, name, ready_attr in zip(
        classes,
        ("Handle", "TimerHandle", "Handle"),
        ("_loopscope_ready", "_when", None),
        strict=True,
    ):
        cls.__name__ = cls.__qualname__ = name
        cls._run = _hotpath.twin.TimedRun(probe.recorder, _handle_run, ready_attr, cls, _replay)
    return Handle, TimerHandle, IOHandle


class AsyncioProbe(LoopProbe):
    """Probe for asyncio's loops."""

    implementation = "asyncio"

    def install_hooks(self, loop: AbstractEventLoop) -> None:
        handle_class, timer_class, io_class = _timed_handle_classes(self)
        self.timed_classes: dict[type[Any], type[Any]] = {
            timer_class: _timer_class,
            io_class: _handle_class,
        }
        clock = self.clock
        base: Any = loop
        ready = base._ready
        orig_call_at = loop.call_at
        self.raw_call_at: Callable[..., TimerHandle] | None = orig_call_at

        # call_soon and call_soon_threadsafe both end in _call_soon.
        def _call_soon(callback: Callable[..., object], args: Any, context: Any) -> Any:
            handle: Any = handle_class(callback, args, loop, context)
            handle._loopscope_ready = clock()
            if handle._source_traceback:
                del handle._source_traceback[-1]
            ready.append(handle)
            return handle

        def call_at(when: float, callback: Any, *args: Any, context: Any = None) -> Any:
            timer: Any = orig_call_at(when, callback, *args, context=context)
            if timer._source_traceback:  # debug mode: drop this wrapper's frame, as asyncio does
                del timer._source_traceback[-1]
            if timer.__class__ is _timer_class:
                timer.__class__ = timer_class
            return timer

        # _call_soon above is what the hot path falls back to for calls of another shape.
        hook = _hotpath.twin.CallSoon(
            self.recorder, handle_class, loop, ready.append, "_loopscope_ready", _call_soon
        )
        self.patch(loop, "_call_soon", hook)
        self.patch(loop, "call_at", call_at)
        for name in ("_add_reader", "_add_writer"):
            original = getattr(loop, name, None)
            if original is not None:
                self.patch(loop, name, _timed_io_registration(original, io_class))
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
        self.untime_handles(loop)
        super().remove_hooks(loop)
        self.raw_call_at = None  # bound to the loop: see LoopProbe.remove_hooks

    def untime_handles(self, loop: AbstractEventLoop) -> None:
        """Give the handles that outlive the hooks their own class back: the readers and
        writers registered meanwhile (the loop's self-pipe among them) and the timers
        still scheduled, so that nothing is timed after uninstall().  (A plain handle
        already in the ready queue runs once more, timed: its class has a slot asyncio's
        has not, so it cannot be switched back.)"""
        classes = getattr(self, "timed_classes", None)
        if not classes:
            return
        base: Any = loop
        handles: list[Any] = list(getattr(base, "_scheduled", ()))
        selector = getattr(base, "_selector", None)
        if selector is not None:
            with contextlib.suppress(Exception):  # closed meanwhile
                for key in list(selector.get_map().values()):
                    if isinstance(key.data, tuple):
                        handles.extend(key.data)
        for handle in handles:
            own = classes.get(type(handle))
            if own is not None:
                handle.__class__ = own

    def schedule_raw(
        self, loop: AbstractEventLoop, delay: float, callback: Callable[[], None]
    ) -> TimerHandle:
        # The class's call_at, not the instance's: loopscope's timer is not measured.
        # (Once the hooks are removed, the instance's is the loop's own again.)
        call_at = self.raw_call_at or loop.call_at
        return call_at(loop.time() + delay, callback)


class _Raise:
    """Stands in for a handle's context for one call: puts the real context back (3.12+
    runs the exception handler in it) and raises the exception it carries."""

    __slots__ = ("context", "exc", "handle")

    def __init__(self, handle: Any, exc: BaseException) -> None:
        self.handle: Any = handle
        self.context: Any = handle._context
        self.exc: BaseException | None = exc

    def run(self, *_args: object) -> None:
        exc, self.exc = self.exc, None
        self.handle._context, self.handle = self.context, None
        try:
            raise exc  # type: ignore[misc]
        finally:
            del exc  # no cycle through this frame


def _replay(handle: Any, exc: BaseException) -> None:
    """The hot path ran a handle's callback, which raised ``exc``: hand it to asyncio's own
    ``Handle._run`` (this Python version's message, context and handler call)."""
    stand_in = _Raise(handle, exc)
    handle._context = stand_in
    try:
        _handle_run(handle)
    finally:
        handle._context = stand_in.context


def _timed_io_registration(
    original: Callable[..., Any], io_class: type[events.Handle]
) -> Callable[..., Any]:
    """Wrap ``_add_reader``/``_add_writer``: the handle they register becomes timed."""

    def register(fd: Any, callback: Any, *args: Any) -> Any:
        handle = original(fd, callback, *args)
        if handle.__class__ is _handle_class:
            handle.__class__ = io_class
        return handle

    return register
