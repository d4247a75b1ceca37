"""The pure-Python twin of the C recorder (``_c/recorder.c``): the per-loop figures of the
measured steps, and the watchdog's step markers.

The C recorder keeps its figures in C arrays and folds them into the loop's
:class:`~loopscope._stats.LoopStats` when asked (:meth:`Recorder.flush`, at scrape time,
with the GIL making the two exclusive).  Python code cannot make a read-modify-write atomic
against a flush from another thread, so this twin writes straight into the probe's
``LoopStats``, whose only writer is the loop's thread; it has nothing to fold.
"""

from __future__ import annotations

import sys
import time
import weakref
from asyncio import format_helpers
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from .._stats import BUCKETS, LoopStats

__all__ = ["CreateTask", "Recorder", "RunForever", "restack", "watched_recorders"]


def restack(trace: Any, depth: int = 2) -> None:
    """Debug mode: ``trace`` (a source traceback, changed in place) is the stack that the
    loop kept from the calling wrapper's frame down; make it the stack it keeps without the
    wrapper, taken from the wrapper's caller (``depth`` frames up from here).  Where the
    stack was cut, the wrapper's frame took the place of an older one, which this keeps."""
    try:
        if trace:
            trace[:] = format_helpers.extract_stack(sys._getframe(depth), limit=len(trace))
    except Exception:
        pass  # not a stack as asyncio and uvloop keep them: left as it is


#: Recorders on the native clock, which the watchdog's wait reads (``watch.py``).
watched_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()


class Recorder:
    """Per-loop figures (written into ``probe.stats``) and the step markers."""

    __slots__ = (
        "__weakref__",
        "_clock",
        "_exemplar_floor",
        "_floor",
        "_native_clock",
        "_step_type",
        "_task_types",
        "busy_from_callbacks",
        "chain_end",
        "current_callback",
        "current_start",
        "probe",
        "threshold",
    )

    def __init__(
        self,
        probe: Any,
        clock: Callable[[], float],
        threshold: float,
        busy_from_callbacks: bool,
        task_types: tuple[type[Any], ...],
    ) -> None:
        if not isinstance(task_types, tuple):
            raise TypeError("Recorder() argument 'task_types' must be tuple")
        self.probe = probe
        self._clock = clock
        self.threshold = float(threshold)
        #: See exemplar_floor; _floor is the lower of it and threshold, the one comparison
        #: per step.
        self._exemplar_floor = float("inf")
        self._floor = self.threshold
        self.busy_from_callbacks = int(bool(busy_from_callbacks))
        self._task_types = task_types
        self._native_clock = int(clock is time.monotonic)
        #: Start of the step running now (the probe's clock), 0.0 between steps.
        self.current_start = 0.0
        #: The callback of the step running now, or None.
        self.current_callback: object = None
        #: The end of the last step a next one may start at (TimedCallback), 0.0 once
        #: anything else measured has run, the loop has stopped or started, or a heartbeat
        #: has run.
        self.chain_end = 0.0
        #: The type of asyncio's C task step wrapper, once a step of a C task was seen.
        self._step_type: type[Any] | None = None
        if self._native_clock:
            watched_recorders.add(self)

    @property
    def watched(self) -> bool:
        """Whether watch_steps() sees this recorder's steps."""
        return bool(self._native_clock)

    @property
    def exemplar_floor(self) -> float:
        """Task steps this long or longer (and shorter than threshold) are offered to
        ``probe.offer_exemplar(callback, task, start, duration)``; inf (the default): none."""
        return self._exemplar_floor

    @exemplar_floor.setter
    def exemplar_floor(self, value: float) -> None:
        floor = float(value)
        self._exemplar_floor = floor
        self._floor = floor if floor < self.threshold else self.threshold

    def flush(self, stats: LoopStats, /) -> None:
        """Fold the figures kept here into a LoopStats: this twin keeps none (see above)."""

    def pending(self) -> bool:
        """True if figures are waiting for flush(): never, in this twin."""
        return False

    def record(self, callback: object, ready: float, start: float, end: float, /) -> None:
        """One callback that became runnable at ``ready`` and ran from start to end."""
        stats = self.probe.stats
        duration = end - start if end > start else 0.0
        hist = stats.callback_duration
        hist.counts[bisect_left(BUCKETS, duration)] += 1
        hist.total += duration
        delay = start - ready
        if delay < 0.0:
            delay = 0.0
        hist = stats.schedule_delay
        hist.counts[bisect_left(BUCKETS, delay)] += 1
        hist.total += delay
        if self.busy_from_callbacks:
            stats.busy_seconds += duration
        owner = getattr(callback, "__self__", None)
        if owner is not None and isinstance(owner, self._task_types):
            stats.task_steps += 1
            if self._step_type is None and type(owner).__module__ == "_asyncio":
                self._learn_step_type(callback, owner)
        else:
            owner = None
        if duration >= self._floor:
            if duration >= self.threshold:
                self.probe.record_slow(callback, owner, start, duration)
            elif owner is not None:
                self.probe.offer_exemplar(callback, owner, start, duration)

    def _learn_step_type(self, callback: object, owner: object) -> None:
        """Keep the type of ``callback``, a step of ``owner``, if it is asyncio's C task step
        wrapper and ``owner`` a C task (not a subclass), as the C twin learns it."""
        kind = type(callback)
        if (
            kind.__name__ == "TaskStepMethWrapper"
            and kind.__module__ in ("builtins", "_asyncio")
            and type(owner).__qualname__ == "Task"
        ):
            self._step_type = kind

    def record_io(self, callback: object, start: float, end: float, /) -> None:
        """One I/O callback (reader, writer, protocol method): no schedule delay, no task."""
        stats = self.probe.stats
        duration = end - start if end > start else 0.0
        hist = stats.callback_duration
        hist.counts[bisect_left(BUCKETS, duration)] += 1
        hist.total += duration
        if self.busy_from_callbacks:
            stats.busy_seconds += duration
        if duration >= self.threshold:
            self.probe.record_slow(callback, None, start, duration)


def CreateTask(create_task: Callable[..., Any], recorder: Recorder) -> Callable[..., Any]:
    """The loop's create_task, counting the tasks it creates (attribute: ``create_task``).
    A plain function rather than an instance with ``__call__``: see ``asyncio_hooks``."""
    if not isinstance(recorder, Recorder):
        raise TypeError("CreateTask() argument 'recorder' must be a Recorder")
    probe = recorder.probe

    def counted_create_task(*args: Any, **kwargs: Any) -> Any:
        task = create_task(*args, **kwargs)
        restack(getattr(task, "_source_traceback", None))
        probe.stats.tasks_created += 1
        return task

    setattr(counted_create_task, "create_task", create_task)  # noqa: B010
    return counted_create_task


def RunForever(
    start: Callable[[], bool], run_forever: Callable[..., Any], stop: Callable[[], None]
) -> Callable[..., Any]:
    """The loop's run_forever between ``start()`` and ``stop()``, which follows when
    ``start()`` returned true (attribute: ``run_forever``).  The C twin keeps no frame on
    the stack while the loop runs; this one cannot help keeping its own."""

    def measured_run_forever(*args: Any, **kwargs: Any) -> Any:
        if not start():
            return run_forever(*args, **kwargs)
        try:
            return run_forever(*args, **kwargs)
        finally:
            stop()

    setattr(measured_run_forever, "run_forever", run_forever)  # noqa: B010
    return measured_run_forever
