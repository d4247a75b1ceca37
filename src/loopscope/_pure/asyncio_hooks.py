"""The pure-Python twin of the C interception of asyncio's loop (``_c/asyncio_hooks.c``):
``loop._call_soon`` making timed handles, the ``_run`` of those handles, and the poller of
the loop's selector, timed for busy time.

Both are called on every step, so this twin makes them plain functions (closures) rather
than instances of classes: Python binds and calls a function in a few tens of
nanoseconds, while an instance's ``__call__``, or a ``__get__`` written in Python (which
the ``_run`` of a handle class would need), costs one more Python call on every step,
about 90 and 300 ns on CPython 3.11.  The names, parameters and attributes are the C
twin's.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

from .recorder import Recorder

__all__ = ["CallSoon", "TimedPoller", "TimedRun"]


def CallSoon(
    recorder: Recorder,
    handle_class: type[Any],
    loop: Any,
    append: Callable[[Any], object],
    ready_attr: str,
    fallback: Callable[..., Any],
) -> Callable[..., Any]:
    """asyncio's loop._call_soon, making timed handles (attribute: ``fallback``)."""
    if not isinstance(recorder, Recorder):
        raise TypeError("CallSoon() argument 'recorder' must be a Recorder")
    if not isinstance(ready_attr, str):
        raise TypeError("CallSoon() argument 'ready_attr' must be str")
    clock = recorder._clock

    def call_soon(callback: Any, args: Any, context: Any, /) -> Any:
        handle = handle_class(callback, args, loop, context)
        setattr(handle, ready_attr, clock())
        trace = handle._source_traceback
        if trace:  # debug mode: drop this frame, as asyncio's own _call_soon drops its own
            del trace[-1]
        append(handle)
        return handle

    setattr(call_soon, "fallback", fallback)  # noqa: B010 - a function's attribute
    return call_soon


def TimedRun(
    recorder: Recorder,
    handle_run: Callable[[Any], None],
    ready_attr: str | None,
    cls: type[Any] | None = None,
) -> Callable[[Any], None]:
    """The ``_run`` of a timed handle class: asyncio's ``Handle._run`` timed around.

    ``ready_attr`` names the handle's attribute holding when it became runnable (None: an
    I/O handle, recorded without a schedule delay).  ``cls`` serves the C twin (slot
    offsets); here ``handle_run`` itself runs the callback and handles its exceptions."""
    if not isinstance(recorder, Recorder):
        raise TypeError("TimedRun() argument 'recorder' must be a Recorder")
    clock = recorder._clock

    if ready_attr is None:

        def run_io(handle: Any, /) -> None:
            start = clock()
            # read once: a callback that cancels its own handle clears handle._callback
            callback = recorder.current_callback = handle._callback
            recorder.current_start = start
            try:
                handle_run(handle)  # re-raises only SystemExit and KeyboardInterrupt
            finally:
                recorder.current_start = 0.0
                recorder.current_callback = None  # do not keep the step alive
            try:
                recorder.record_io(callback, start, clock())
            except Exception as exc:
                recorder.probe.fault(exc)

        return run_io

    ready_of = attrgetter(ready_attr)

    def run(handle: Any, /) -> None:
        start = clock()
        callback = recorder.current_callback = handle._callback  # read once, as in run_io
        recorder.current_start = start
        try:
            handle_run(handle)  # re-raises only SystemExit and KeyboardInterrupt
        finally:
            recorder.current_start = 0.0
            recorder.current_callback = None  # do not keep the step alive
        try:
            recorder.record(callback, ready_of(handle), start, clock())
        except Exception as exc:
            recorder.probe.fault(exc)

    return run


def _timed_wait(
    method: Callable[..., Any], recorder: Recorder, waited: list[float], changelist: bool
) -> Callable[..., Any]:
    """The poller's ``method``, adding the seconds each call takes to ``waited[0]``; with
    ``changelist`` (kqueue's control()) only a call without a changelist is a wait, and a
    call with one (a registration) is passed on untimed.

    A closure rather than a method: the loop calls it on every iteration, and each
    attribute read on the TimedPoller goes through its ``__getattr__`` hook (which stops
    CPython from specialising the read), about as much again as the rest of the call."""
    clock = recorder._clock

    def wait(*args: Any, **kwargs: Any) -> Any:
        if changelist and (not args or args[0] is not None):
            return method(*args, **kwargs)
        try:
            start = clock()
        except Exception as exc:
            recorder.probe.fault(exc)
            return method(*args, **kwargs)
        # An error of the wait itself is the loop's to handle, as without loopscope.
        result = method(*args, **kwargs) if kwargs else method(*args)
        try:
            end = clock()
        except Exception as exc:
            recorder.probe.fault(exc)
            return result
        if end > start:
            waited[0] += end - start
        return result

    return wait


class TimedPoller:
    """Stands in for a selector's poller (``select.epoll``, ``select.poll``,
    ``select.devpoll``, ``select.kqueue``: the selector's own ``_selector``), adding the
    seconds its waits take to ``waited``; every other attribute is the poller's.

    A clock that cannot be read is a fault of loopscope's, handed to the probe; the wait
    goes on untimed, and what it returns or raises is the caller's, unchanged."""

    __slots__ = ("_waited", "control", "poll", "poller")

    def __init__(self, poller: Any, recorder: Recorder) -> None:
        if not isinstance(recorder, Recorder):
            raise TypeError("TimedPoller() argument 'recorder' must be a Recorder")
        self.poller = poller
        self._waited = waited = [0.0]
        # What the poller lacks of the two (epoll has no control) stays unset here, so that
        # reading it raises the poller's own AttributeError (through __getattr__).
        if hasattr(poller, "poll"):
            #: The poller's poll(), timed.
            self.poll = _timed_wait(poller.poll, recorder, waited, False)
        if hasattr(poller, "control"):
            #: The poller's control(), timed when it waits (no changelist).
            self.control = _timed_wait(poller.control, recorder, waited, True)

    @property
    def waited(self) -> float:
        """Seconds spent in the timed waits, on the recorder's clock."""
        return self._waited[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.poller, name)

    def __repr__(self) -> str:
        return repr(self.poller)
