"""The pure-Python twin of the C interception of asyncio's loop (``_c/asyncio_hooks.c``):
``loop._call_soon`` making timed handles, and the ``_run`` of those handles."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from .recorder import Recorder

__all__ = ["CallSoon", "TimedRun"]


class CallSoon:
    """asyncio's loop._call_soon, making timed handles."""

    __slots__ = ("_append", "_handle_class", "_loop", "_ready_attr", "_recorder", "fallback")

    def __init__(
        self,
        recorder: Recorder,
        handle_class: type[Any],
        loop: Any,
        append: Callable[[Any], object],
        ready_attr: str,
        fallback: Callable[..., Any],
    ) -> None:
        if not isinstance(recorder, Recorder):
            raise TypeError("CallSoon() argument 'recorder' must be a Recorder")
        if not isinstance(ready_attr, str):
            raise TypeError("CallSoon() argument 'ready_attr' must be str")
        self._recorder = recorder
        self._handle_class = handle_class
        self._loop = loop
        self._append = append
        self._ready_attr = ready_attr
        self.fallback = fallback

    def __call__(self, callback: Any, args: Any, context: Any, /) -> Any:
        handle = self._handle_class(callback, args, self._loop, context)
        setattr(handle, self._ready_attr, self._recorder._clock())
        trace = handle._source_traceback
        if trace:  # debug mode: drop this frame, as asyncio's own _call_soon drops its own
            del trace[-1]
        self._append(handle)
        return handle


class TimedRun:
    """The ``_run`` of a timed handle class: asyncio's ``Handle._run`` timed around.

    ``ready_attr`` names the handle's attribute holding when it became runnable (None: an
    I/O handle, recorded without a schedule delay).  ``cls`` and ``report`` serve the C
    twin (slot offsets, and replaying an exception through asyncio's ``Handle._run``);
    here ``handle_run`` itself runs the callback and handles its exceptions."""

    __slots__ = ("_cls", "_handle_run", "_ready_attr", "_recorder", "_report")

    def __init__(
        self,
        recorder: Recorder,
        handle_run: Callable[[Any], None],
        ready_attr: str | None,
        cls: type[Any] | None = None,
        report: Callable[[Any, BaseException], None] | None = None,
    ) -> None:
        if not isinstance(recorder, Recorder):
            raise TypeError("TimedRun() argument 'recorder' must be a Recorder")
        self._recorder = recorder
        self._handle_run = handle_run
        self._ready_attr = ready_attr
        self._cls = cls
        self._report = report

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        return types.MethodType(self, obj)

    def __call__(self, handle: Any, /) -> None:
        recorder = self._recorder
        clock = recorder._clock
        start = clock()
        recorder.current_callback = handle._callback
        recorder.current_start = start
        try:
            self._handle_run(handle)  # re-raises only SystemExit and KeyboardInterrupt
        finally:
            recorder.current_start = 0.0
            recorder.current_callback = None  # do not keep the step alive
        try:
            ready_attr = self._ready_attr
            if ready_attr is None:
                recorder.record_io(handle._callback, start, clock())
            else:
                recorder.record(handle._callback, getattr(handle, ready_attr), start, clock())
        except Exception as exc:
            recorder.probe.fault(exc)
