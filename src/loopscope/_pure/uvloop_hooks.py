"""The pure-Python twin of the C interception of uvloop (``_c/uvloop_hooks.c``): the timed
callbacks, the timed I/O callbacks, and ``call_soon``/``call_later`` wrapping the callback."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .recorder import Recorder

__all__ = ["Intercept", "TimedCallback", "TimedIO"]

#: Calls with more arguments than this go to the fallback (as in the C twin).
_STACK_ARGS = 8


class TimedCallback:
    """A callback that measures itself (uvloop); repr() is the callback's."""

    __slots__ = ("_recorder", "callback", "ready")

    def __init__(self, callback: Callable[..., object], recorder: Recorder, ready: float) -> None:
        self.callback = callback
        self._recorder = recorder
        self.ready = float(ready)

    @property
    def probe(self) -> Any:
        return self._recorder.probe

    def __call__(self, *args: Any) -> object:
        recorder = self._recorder
        callback = self.callback
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
                recorder.record(callback, self.ready, start, clock())
            except Exception as exc:
                recorder.probe.fault(exc)

    def __repr__(self) -> str:
        return repr(self.callback)


class TimedIO:
    """An I/O callback that measures itself (uvloop); repr() is the callback's."""

    __slots__ = ("_recorder", "callback")

    def __init__(self, callback: Callable[..., object], recorder: Recorder) -> None:
        if not isinstance(recorder, Recorder):
            raise TypeError("TimedIO() argument 'recorder' must be a Recorder")
        self.callback = callback
        self._recorder = recorder

    @property
    def probe(self) -> Any:
        return self._recorder.probe

    def __call__(self, *args: Any) -> object:
        recorder = self._recorder
        callback = self.callback
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

    def __repr__(self) -> str:
        return repr(self.callback)


class Intercept:
    """uvloop's call_soon/call_soon_threadsafe/call_later, wrapping the callback."""

    __slots__ = ("_later", "_loop_time", "_recorder", "fallback", "original")

    def __init__(
        self,
        kind: str,
        recorder: Recorder,
        original: Callable[..., Any],
        fallback: Callable[..., Any],
        loop_time: Callable[[], float] | None = None,
    ) -> None:
        if kind not in ("call_soon", "call_later"):
            raise ValueError("kind must be 'call_soon' or 'call_later'")
        if kind == "call_later" and not callable(loop_time):
            raise TypeError("call_later needs loop_time")
        if not isinstance(recorder, Recorder):
            raise TypeError("Intercept() argument 'recorder' must be a Recorder")
        self._later = kind == "call_later"
        self._recorder = recorder
        self.original = original
        self.fallback = fallback
        self._loop_time = loop_time

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) + len(kwargs) > _STACK_ARGS or (kwargs and list(kwargs) != ["context"]):
            return self.fallback(*args, **kwargs)
        recorder = self._recorder
        if not self._later:
            if not args:
                return self.fallback(*args, **kwargs)
            wrapped = TimedCallback(args[0], recorder, recorder._clock())
            return self.original(wrapped, *args[1:], **kwargs)
        if len(args) < 2:
            return self.fallback(*args, **kwargs)
        delay = args[0]
        if type(delay) is not float and type(delay) is not int:
            return self.fallback(*args, **kwargs)
        try:
            seconds = float(delay)
        except OverflowError:
            return self.fallback(*args, **kwargs)
        if math.isnan(seconds):  # let max() decide, as the fallback does
            return self.fallback(*args, **kwargs)
        loop_time: Any = self._loop_time
        ready = loop_time() + (seconds if seconds > 0.0 else 0.0)
        wrapped = TimedCallback(args[1], recorder, ready)
        return self.original(delay, wrapped, *args[2:], **kwargs)

    def __repr__(self) -> str:
        kind = "call_later" if self._later else "call_soon"
        return f"<loopscope {kind} of {self.original!r}>"
