"""Hooks for asyncio's own loops (``BaseEventLoop`` and its subclasses).

Callbacks are timed by the handles themselves: the loop's ``_call_soon`` and ``call_at``
produce per-loop subclasses of ``asyncio.Handle`` and ``asyncio.TimerHandle`` whose
``_run`` reads the clock around the original, and the reader and writer handles that
``_add_reader``/``_add_writer`` register (the I/O callbacks: a transport's ``_read_ready``
calls ``Protocol.data_received``) are switched to a timed class too.  The subclasses keep
the class names, the callback and every slot, so ``repr()``, ``cancel()``, ``when()`` and
asyncio's own error messages are unchanged.

Busy time is wall time in ``run_forever`` less the time spent waiting for I/O, measured one
level below the loop's selector: when ``loop._selector`` is one of the standard selectors
(``EpollSelector``, ``KqueueSelector``, ``PollSelector``, ``DevpollSelector``), its own
poller (``select.epoll`` and kin, the selector's ``_selector``) is replaced by the hot
path's ``TimedPoller``, which forwards every call and counts the seconds its waits take.
``loop._selector`` itself stays the loop's own object.  With any other selector (a Mock,
asyncio's test selectors, a ``SelectSelector``), busy time is the sum of the measured
callbacks, as on uvloop without libuv's idle time.
"""

from __future__ import annotations

import contextlib
import select
import selectors
import weakref
from asyncio import AbstractEventLoop, TimerHandle, events
from collections.abc import Callable
from typing import Any

from . import _hotpath
from ._probe import LoopProbe, class_method, restack

__all__ = ["AsyncioProbe"]

_handle_run = events.Handle._run
_handle_class = events.Handle
_timer_class = events.TimerHandle


def _poller_types() -> list[tuple[object, type[Any]]]:
    """For each ``select()`` of the standard selectors that waits in its poller's ``poll()``
    or ``control()``: the type that poller (the selector's ``_selector``) must have."""
    known: list[tuple[object, type[Any]]] = []
    for selector_name, poller_name in (
        ("EpollSelector", "epoll"),
        ("DevpollSelector", "devpoll"),
        ("KqueueSelector", "kqueue"),
        ("PollSelector", "poll"),
    ):
        selector_class = getattr(selectors, selector_name, None)
        poller_type = getattr(select, poller_name, None)
        if selector_class is None or poller_type is None:
            continue
        if not isinstance(poller_type, type):  # select.poll is a function
            poller_type = type(poller_type())
        known.append((selector_class.select, poller_type))
    return known


_POLLER_TYPES = _poller_types()


def _weak_ref(obj: object) -> weakref.ref[Any] | None:
    """A weak reference to ``obj``, or None for an object that takes none."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _raw_poller(selector: object) -> Any:
    """The poller the standard ``selector`` waits in, or None: the selector is of another
    kind (a Mock, asyncio's test selectors, one of the application's own, a
    ``SelectSelector``), overrides ``select()``, or is closed."""
    select_function = getattr(type(selector), "select", None)
    for known_select, poller_type in _POLLER_TYPES:
        if select_function is known_select:
            poller = getattr(selector, "_selector", None)
            return poller if type(poller) is poller_type else None
    return None


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
        cls._run = _hotpath.twin.TimedRun(probe.recorder, _handle_run, ready_attr, cls)
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
        #: The class's call_at, called with the loop first (see schedule_raw).
        self.raw_call_at: Callable[..., TimerHandle] | None = class_method(loop, "call_at")

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
            restack(getattr(timer, "_source_traceback", None))  # debug mode: without this frame
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

    #: The poller put in the selector's place, and the selector it was put in (a weak
    #: reference: the selector's keys refer to the loop's handles, and through them to the
    #: loop, which a probe must not keep alive).
    timed_poller: Any = None
    timed_selector_ref: weakref.ref[Any] | None = None

    def timed_selector(self) -> Any:
        """The selector whose poller is timed, or None."""
        ref = self.timed_selector_ref
        return None if ref is None else ref()

    #: ``timed_poller.waited`` when busy time was last settled.
    waited_mark = 0.0

    def time_io_wait(self, loop: AbstractEventLoop) -> None:
        """Time the wait of the loop's selector, if it is a standard one; else busy time is
        the sum of the callbacks.  Done when the loop starts running, because subclasses
        (and asyncio's own test loops) set or replace ``_selector`` after ``__init__``."""
        selector: Any = getattr(loop, "_selector", None)
        poller = self.timed_poller
        if (
            poller is None
            or selector is not self.timed_selector()
            or getattr(selector, "_selector", None) is not poller
        ):
            self.untime_io_wait()
            raw = _raw_poller(selector)
            selector_ref = _weak_ref(selector) if raw is not None else None
            if selector_ref is not None:
                self.timed_poller = _hotpath.twin.TimedPoller(raw, self.recorder)
                self.timed_selector_ref = selector_ref
                selector._selector = self.timed_poller
        self.busy_from_callbacks = self.timed_poller is None
        self.recorder.busy_from_callbacks = self.busy_from_callbacks
        if self.timed_poller is not None:
            self.waited_mark = self.timed_poller.waited

    def untime_io_wait(self) -> None:
        """Give the selector its own poller back (unless it holds another by now)."""
        poller: Any = self.timed_poller
        selector: Any = self.timed_selector()
        self.timed_poller = None
        self.timed_selector_ref = None
        if poller is None:
            return
        raw = poller.poller
        if getattr(selector, "_selector", None) is poller:
            selector._selector = raw

    def settle_busy(self) -> None:
        """Add wall time since ``busy_mark``, less the time waited in the poller meanwhile."""
        poller = self.timed_poller
        if self.busy_mark is None or self.busy_from_callbacks or poller is None:
            return
        now = self.clock()
        waited = poller.waited
        busy = (now - self.busy_mark) - (waited - self.waited_mark)
        if busy > 0.0:
            self.stats.busy_seconds += busy
        self.busy_mark = now
        self.waited_mark = waited

    def on_run_start(self, loop: AbstractEventLoop) -> None:
        self.time_io_wait(loop)
        super().on_run_start(loop)

    def on_beat(self) -> None:
        self.settle_busy()

    def remove_hooks(self, loop: AbstractEventLoop) -> None:
        self.settle_busy()
        self.untime_io_wait()
        self.untime_handles(loop)
        super().remove_hooks(loop)
        self.raw_call_at = None  # the loop's own call_at is the class's again

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
        if self.raw_call_at is None:
            return loop.call_at(loop.time() + delay, callback)
        return self.raw_call_at(loop, loop.time() + delay, callback)


def _timed_io_registration(
    original: Callable[..., Any], io_class: type[events.Handle]
) -> Callable[..., Any]:
    """Wrap ``_add_reader``/``_add_writer``: the handle they register becomes timed."""

    def register(fd: Any, callback: Any, *args: Any) -> Any:
        handle = original(fd, callback, *args)
        # debug mode: without this frame (before _add_reader's); a loop's own _add_reader
        # may return anything
        restack(getattr(handle, "_source_traceback", None), keep=1)
        if handle.__class__ is _handle_class:
            handle.__class__ = io_class
        return handle

    return register
