"""One :class:`LoopProbe` per instrumented loop: what every kind of loop shares.

The loop-specific hooks (how callbacks are intercepted) live in ``_asyncio_hooks`` and
``_uvloop_hooks``; both call :meth:`LoopProbe.after_step` once a callback has run.  The
probe also owns the lag heartbeat, the label of the loop and the fault switch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from asyncio import AbstractEventLoop, TimerHandle
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._describe import TASK_TYPES
from ._stats import BUCKETS, LoopStats

if TYPE_CHECKING:
    from ._installation import Installation

__all__ = ["LoopProbe"]

_fallback = logging.getLogger("loopscope")
_MISSING = object()


class LoopProbe:
    """Measures one loop.  Only the loop's own thread calls the recording methods."""

    implementation = "asyncio"
    #: uvloop has no selector to wrap: busy time is the sum of the measured callbacks.
    busy_from_callbacks = False

    def __init__(self, loop: AbstractEventLoop, installation: Installation) -> None:
        options = installation.options
        self.installation = installation
        self.loop_ref: weakref.ref[AbstractEventLoop] = weakref.ref(loop, self._loop_collected)
        self.key = id(self)
        self.clock: Callable[[], float] = installation.clock
        self.threshold = options.slow_threshold
        self.lag_interval = options.lag_interval
        self.fixed_name = options.loop_name
        self.events = installation.events
        self.active = True
        self.label = ""
        self.stats = LoopStats()
        self.attached = False
        self.heartbeat: TimerHandle | None = None
        self.heartbeat_due = 0.0
        self.busy_mark: float | None = None
        self._saved_attrs: dict[str, object] = {}
        self._attach(self.fixed_name or threading.current_thread().name)

    # --- labels --------------------------------------------------------------------------

    def _attach(self, name: str) -> None:
        book = self.installation.book
        if self.attached:
            book.detach(self.label, self.key)
        self.label, self.stats = book.attach(name, self.implementation, self.key)
        self.attached = True

    def _detach(self) -> None:
        if self.attached:
            self.attached = False
            self.installation.book.detach(self.label, self.key)

    def _loop_collected(self, _ref: object) -> None:
        # The loop was garbage-collected without close(): keep its figures, drop the probe.
        self.active = False
        self._detach()
        self.installation.forget(self)

    # --- patching helpers ----------------------------------------------------------------

    def patch(self, loop: AbstractEventLoop, name: str, replacement: object) -> None:
        """Shadow ``loop.name`` with an instance attribute, remembering what was there."""
        self._saved_attrs[name] = loop.__dict__.get(name, _MISSING)
        loop.__dict__[name] = replacement

    def patch_lifecycle(self, loop: AbstractEventLoop) -> None:
        """Hook task creation, the start and end of run_forever, and close()."""
        probe = self
        orig_run_forever = loop.run_forever
        orig_close = loop.close
        orig_create_task = loop.create_task

        def create_task(coro: Any, **kwargs: Any) -> Any:
            task = orig_create_task(coro, **kwargs)
            probe.stats.tasks_created += 1
            return task

        def run_forever() -> None:
            if loop.is_running() or loop.is_closed() or not probe.active:
                return orig_run_forever()
            probe.on_run_start(loop)
            try:
                return orig_run_forever()
            finally:
                probe.on_run_stop()

        def close() -> None:
            orig_close()
            if loop.is_closed() and probe.active:
                probe.on_close()

        self.patch(loop, "create_task", create_task)
        self.patch(loop, "run_forever", run_forever)
        self.patch(loop, "close", close)

    def unpatch_all(self, loop: AbstractEventLoop) -> None:
        """Undo every :meth:`patch`."""
        for name, previous in self._saved_attrs.items():
            if previous is _MISSING:
                loop.__dict__.pop(name, None)
            else:
                loop.__dict__[name] = previous
        self._saved_attrs.clear()

    # --- hot path ------------------------------------------------------------------------

    def after_step(self, callback: object, ready: float, start: float, end: float) -> None:
        """Record one callback that became runnable at ``ready`` and ran from start to end."""
        stats = self.stats
        duration = end - start
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
        if owner is not None and isinstance(owner, TASK_TYPES):
            stats.task_steps += 1
        else:
            owner = None
        if duration >= self.threshold:
            stats.slow_callbacks += 1
            stats.blocked_seconds += duration
            self.events.slow_callback(self.label, duration, self.threshold, callback, owner)

    def task_created(self) -> None:
        """Count one task created through ``loop.create_task``."""
        self.stats.tasks_created += 1

    # --- run / stop ----------------------------------------------------------------------

    def on_run_start(self, loop: AbstractEventLoop) -> None:
        """The loop starts running in the current thread."""
        if self.fixed_name is None:
            name = threading.current_thread().name
            if name != self.label:
                self._attach(name)
        self.busy_mark = self.clock()
        self.start_heartbeat(loop)

    def on_run_stop(self) -> None:
        """The loop stops running: time outside run_forever is neither busy nor lag."""
        self.stop_heartbeat()
        if self.busy_mark is not None and not self.busy_from_callbacks:
            self.stats.busy_seconds += self.clock() - self.busy_mark
        self.busy_mark = None

    def schedule_raw(
        self, loop: AbstractEventLoop, delay: float, callback: Callable[[], None]
    ) -> TimerHandle:
        """Schedule loopscope's own timer, bypassing the measurement hooks."""
        raise NotImplementedError

    def start_heartbeat(self, loop: AbstractEventLoop) -> None:
        """Arm the lag probe."""
        self.stop_heartbeat()
        self.heartbeat_due = loop.time() + self.lag_interval
        self.heartbeat = self.schedule_raw(loop, self.lag_interval, self._beat)

    def stop_heartbeat(self) -> None:
        """Disarm the lag probe (from the loop's thread, or while the loop is stopped)."""
        if self.heartbeat is not None:
            self.heartbeat.cancel()
            self.heartbeat = None

    def _beat(self) -> None:
        loop = self.loop_ref()
        if loop is None or not self.active:
            return
        try:
            now = loop.time()
            lag = now - self.heartbeat_due
            if lag < 0.0:
                lag = 0.0
            hist = self.stats.lag
            hist.counts[bisect_left(BUCKETS, lag)] += 1
            hist.total += lag
            self.heartbeat_due = now + self.lag_interval
            self.heartbeat = self.schedule_raw(loop, self.lag_interval, self._beat)
        except Exception as exc:
            self.fault(exc)

    # --- life cycle ----------------------------------------------------------------------

    def install_hooks(self, loop: AbstractEventLoop) -> None:
        """Patch ``loop`` (implemented per loop kind)."""
        raise NotImplementedError

    def remove_hooks(self, loop: AbstractEventLoop) -> None:
        """Undo :meth:`install_hooks` (implemented per loop kind)."""
        self.unpatch_all(loop)

    def on_close(self) -> None:
        """The loop was closed: fold its figures into its label and let it go."""
        loop = self.loop_ref()
        self.active = False
        self.heartbeat = None
        if loop is not None:
            self.remove_hooks(loop)
        self._detach()
        self.installation.forget(self)

    def remove(self) -> None:
        """Take the instrumentation off the loop (uninstall, or a fault)."""
        loop = self.loop_ref()
        self.active = False
        if loop is not None:
            self.remove_hooks(loop)
            handle, self.heartbeat = self.heartbeat, None
            if handle is not None:
                if loop.is_running() and not _in_loop_thread(loop):
                    with contextlib.suppress(RuntimeError):  # closed meanwhile
                        loop.call_soon_threadsafe(handle.cancel)
                else:
                    handle.cancel()
            if self.busy_mark is not None and not self.busy_from_callbacks:
                self.stats.busy_seconds += self.clock() - self.busy_mark
                self.busy_mark = None
        self._detach()
        self.installation.forget(self)

    def fault(self, exc: BaseException) -> None:
        """An error in loopscope's own bookkeeping: report it once, stop measuring this loop."""
        self.installation.report_fault(f"measuring loop {self.label!r}", exc)
        try:
            self.remove()
        except Exception as second:
            _fallback.error("loopscope: could not remove instrumentation: %r", second)


def _in_loop_thread(loop: Any) -> bool:
    import asyncio

    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
