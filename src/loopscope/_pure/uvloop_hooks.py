"""The pure-Python twin of the C interception of uvloop (``_c/uvloop_hooks.c``): the timed
callbacks, the timed I/O callbacks, and ``call_soon``/``call_later`` wrapping the callback."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import MethodType
from typing import Any

from .recorder import Recorder, restack

__all__ = ["Intercept", "TimedCallback", "TimedIO"]


class TimedCallback:
    """A callback that measures itself (uvloop); repr(), str(), ``__self__``,
    ``__qualname__`` and ``__name__`` are the callback's."""

    # One slot read per call, not three: with the __getattr__ below, every attribute read
    # of an instance takes the interpreter's slower, unspecialised path.
    __slots__ = ("_state",)

    def __init__(self, callback: Callable[..., object], recorder: Recorder, ready: float) -> None:
        self._state = (callback, recorder, ready)

    @property
    def callback(self) -> Callable[..., object]:
        return self._state[0]

    @property
    def ready(self) -> float:
        return self._state[2]

    @property
    def probe(self) -> Any:
        return self._state[1].probe

    def __call__(self, *args: Any) -> object:
        callback, recorder, ready = self._state
        clock = recorder._clock
        chain_end = recorder.chain_end
        recorder.chain_end = 0.0
        if chain_end and ready <= chain_end and type(callback) is recorder._step_type:
            start = chain_end  # a task step that waited in the ready queue (as in C)
        else:
            start = clock()
        recorder.current_callback = callback
        recorder.current_start = start
        try:
            return callback(*args)
        finally:
            recorder.current_start = 0.0
            recorder.current_callback = None  # do not keep the step alive
            try:
                end = clock()
                recorder.record(callback, ready, start, end)
                if end - start < recorder._floor:  # else its record ran a report after end
                    recorder.chain_end = end
            except Exception as exc:
                recorder.probe.fault(exc)

    def __getattr__(self, name: str) -> Any:
        # What uvloop reads to describe a callback is the callback's: __self__ (a task step
        # is shown as its task), __qualname__ and __name__ (a handle's repr); AttributeError
        # exactly when the callback has none.  (A class cannot hold a __qualname__ property.)
        if name in _DESCRIBING:
            return getattr(self._state[0], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return repr(self._state[0])

    def __str__(self) -> str:
        return str(self._state[0])


#: The attributes of a callback that TimedCallback forwards.
_DESCRIBING = frozenset(("__self__", "__qualname__", "__name__"))


class TimedIO:
    """An I/O callback that measures itself (uvloop); repr(), str(), ``__self__``,
    ``__qualname__`` and ``__name__`` are the callback's.

    With ``instance``, a weak reference, it calls ``callback(instance(), *args)``: a
    protocol method is kept as its function and a weak reference to the protocol, since a
    bound method stored in the protocol's ``__dict__`` would be a reference cycle.  Once the
    instance is gone (only a caller that kept the method after dropping the protocol can
    see that) a call does nothing."""

    # One slot read per call, as in TimedCallback (its __getattr__ makes every read slower).
    __slots__ = ("_state",)

    def __init__(
        self,
        callback: Callable[..., object],
        recorder: Recorder,
        instance: weakref.ref[Any] | None = None,
    ) -> None:
        if not isinstance(recorder, Recorder):
            raise TypeError("TimedIO() argument 'recorder' must be a Recorder")
        if instance is not None and not isinstance(instance, weakref.ref):
            raise TypeError("TimedIO() argument 'instance' must be a weak reference")
        self._state = (callback, recorder, instance)

    @property
    def callback(self) -> Callable[..., object] | None:
        """The method it times (None once its instance is gone)."""
        function, _, instance = self._state
        if instance is None:
            return function
        bound_to = instance()
        return None if bound_to is None else MethodType(function, bound_to)

    @property
    def probe(self) -> Any:
        return self._state[1].probe

    def __call__(self, *args: Any) -> object:
        callback, recorder, instance = self._state
        if instance is not None:
            bound_to = instance()
            if bound_to is None:
                return None
            args = (bound_to,) + args  # noqa: RUF005 - cheaper than (bound_to, *args)
        recorder.chain_end = 0.0
        if recorder.current_start or not recorder.probe.active:
            # Called from inside a step that is already measured (or after uninstall).
            return callback(*args)
        clock = recorder._clock
        start = clock()
        recorder.current_callback = callback
        recorder.current_start = start
        try:
            return callback(*args)
        finally:
            recorder.current_start = 0.0
            recorder.current_callback = None  # do not keep the step alive
            try:
                recorder.record_io(callback, start, clock())
            except Exception as exc:
                recorder.probe.fault(exc)

    def __getattr__(self, name: str) -> Any:
        # As TimedCallback's: what uvloop reads to describe a reader's or writer's handle.
        if name in _DESCRIBING:
            method = self.callback
            if method is not None:
                return getattr(method, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        function, _, instance = self._state
        if instance is not None and instance() is None:
            return f"<{type(self).__name__} of {function!r}, its instance gone>"
        return repr(self.callback)

    def __str__(self) -> str:
        method = self.callback
        return repr(self) if method is None else str(method)


def Intercept(
    kind: str,
    recorder: Recorder,
    original: Callable[..., Any],
    fallback: Callable[..., Any],
    loop_time: Callable[[], float] | None = None,
) -> Callable[..., Any]:
    """uvloop's call_soon/call_soon_threadsafe/call_later, wrapping the callback in a
    TimedCallback, or add_reader/add_writer (kind ``add_reader``), wrapping it in a TimedIO
    (attributes: ``original``, ``fallback``).

    A plain function, as in ``asyncio_hooks``: it is called for every step.  It does what
    the fallback does, so a call of another shape fails with the fallback's own message
    (the C twin hands such calls to the fallback)."""
    if kind not in ("call_soon", "call_later", "add_reader"):
        raise ValueError("kind must be 'call_soon', 'call_later' or 'add_reader'")
    if kind == "call_later" and not callable(loop_time):
        raise TypeError("call_later needs loop_time")
    if not isinstance(recorder, Recorder):
        raise TypeError("Intercept() argument 'recorder' must be a Recorder")
    clock = recorder._clock
    intercept: Callable[..., Any]
    if kind == "add_reader":

        def add_reader(fd: Any, callback: Any, *args: Any) -> Any:
            return original(fd, TimedIO(callback, recorder), *args)

        intercept = add_reader
    elif kind == "call_soon":

        def call_soon(callback: Any, *args: Any, context: Any = None) -> Any:
            handle = original(TimedCallback(callback, recorder, clock()), *args, context=context)
            try:
                trace = handle._source_traceback
            except AttributeError:  # a loop's own method may return anything
                trace = None
            if trace:  # debug mode: without this frame
                restack(trace)
            return handle

        intercept = call_soon
    else:
        now: Any = loop_time

        def call_later(delay: float, callback: Any, *args: Any, context: Any = None) -> Any:
            wrapped = TimedCallback(callback, recorder, now() + max(delay, 0.0))
            timer = original(delay, wrapped, *args, context=context)
            try:
                trace = timer._source_traceback
            except AttributeError:  # a loop's own method may return anything
                trace = None
            if trace:  # debug mode: without this frame
                restack(trace)
            return timer

        intercept = call_later
    for name in ("__name__", "__qualname__"):
        value = getattr(fallback, name, None)
        if isinstance(value, str):
            setattr(intercept, name, value)
    setattr(intercept, "original", original)  # noqa: B010 - a function's attribute
    setattr(intercept, "fallback", fallback)  # noqa: B010
    return intercept
