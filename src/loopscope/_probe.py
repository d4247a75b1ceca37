"""One :class:`LoopProbe` per instrumented loop: what every kind of loop shares.

The loop-specific hooks (how callbacks are intercepted) live in ``_asyncio_hooks`` and
``_uvloop_hooks``; both are made of the hot path's parts (``_hotpath.twin``: the C
accelerator or its pure twin), which time each callback and record it in the probe's
recorder.  The probe also owns the lag heartbeat, the label of the loop, the report of a
slow step and the fault switch.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
import weakref
from asyncio import AbstractEventLoop, BaseEventLoop, TimerHandle, format_helpers
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from . import _gilreader, _hotpath
from ._describe import TASK_TYPES
from ._exemplars import EXEMPLAR_FLOOR, SLOW, Sampler, span_ids, tracing_api, tracing_installed
from ._log import logger
from ._own_class import OwnClass
from ._stacks import application_location
from ._stats import BUCKETS, UNKNOWN_LOCATION, LoopStats, SeriesBook

if TYPE_CHECKING:
    from ._events import EventDispatch
    from ._options import Options

__all__ = ["LoopProbe", "ProbeContext", "class_method", "restack"]


def restack(trace: Any, depth: int = 2, keep: int = 0) -> None:
    """Debug mode: ``trace`` (a source traceback, changed in place) is the stack that the
    loop kept from the calling wrapper's frame down, and ``keep`` frames the loop called
    from it; make it the stack it keeps without the wrapper, taken from the wrapper's
    caller (``depth`` frames up from here).  Where the stack was cut, the wrapper's frame
    took the place of an older one, which this keeps.  (The pure hot path has its own copy:
    it takes nothing from the layers above it.)"""
    try:
        if trace and len(trace) > keep:
            kept = trace[len(trace) - keep :]
            older = format_helpers.extract_stack(sys._getframe(depth), limit=len(trace) - keep)
            trace[:] = older + kept
    except Exception:
        pass  # not a stack as asyncio and uvloop keep them: left as it is


class ProbeContext(Protocol):
    """What a probe needs from the installation that made it, and nothing more."""

    options: Options
    clock: Callable[[], float]
    events: EventDispatch
    book: SeriesBook
    #: ``hook(probe, loop)`` for each feature that patches a loop too (the executors').
    loop_hooks: tuple[Callable[[LoopProbe, AbstractEventLoop], None], ...]

    def forget(self, probe: LoopProbe) -> None:
        """The probe is done with its loop (closed, collected or removed)."""

    def report_block_later(
        self, probe: LoopProbe, capture: _gilreader.Capture, callback: object, task: object
    ) -> None:
        """Have the watchdog report a block the GIL reader saw during a step of ``probe``
        that ended before the watchdog could report it."""

    def report_fault(self, what: str, exc: BaseException) -> None:
        """Report a fault of loopscope's own, once."""


_MISSING = object()

#: Each probe's key in the installation's book.
_keys = itertools.count(1)

#: The attribute of a loop where :meth:`LoopProbe.patch` keeps what it put on the loop
#: itself: name -> (what was there, what was put).  On the loop, not on the probe: what was
#: put refers to the loop, and a probe must never keep its loop alive (the installation
#: keeps the probe until the loop is closed or collected).
_SAVED_ATTRS = "_loopscope_saved_attrs"


def class_method(loop: AbstractEventLoop, name: str) -> Callable[..., Any]:
    """The method ``name`` of the loop's class as it is now, to be called with the loop
    first: a probe keeps this rather than the bound method, which would keep the loop."""
    method: Callable[..., Any] = getattr(type(loop), name)
    return method


def _own_attribute(obj: object, name: str) -> object:
    """``obj``'s own value of ``name`` (an instance attribute), or _MISSING; found without
    reading ``obj.__dict__``, which on CPython 3.11+ would move the object's attributes out
    of its inline values into a dict and make every later method lookup on it slower."""
    try:
        value = object.__getattribute__(obj, name)
    except AttributeError:
        return _MISSING
    for klass in type(obj).__mro__:
        if name in vars(klass):
            static = vars(klass)[name]
            break
    else:
        return value  # the class has no such name: the value is the instance's
    get = getattr(type(static), "__get__", None)
    try:
        bound = get(static, obj, type(obj)) if get is not None else static
        inherited = type(value) is type(bound) and bool(value == bound)
    except Exception:
        inherited = False
    return _MISSING if inherited else value


class LoopProbe:
    """Measures one loop.  Only the loop's own thread calls the recording methods."""

    implementation = "asyncio"
    #: uvloop has no selector to wrap: busy time is the sum of the measured callbacks.
    busy_from_callbacks = False

    def __init__(self, loop: AbstractEventLoop, installation: ProbeContext) -> None:
        options = installation.options
        self.installation = installation
        self.loop_ref: weakref.ref[AbstractEventLoop] = weakref.ref(loop, self._loop_collected)
        self.key = next(_keys)  # not id(self): a figure folded later must find its own
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
        self.thread_id = threading.get_ident()
        # Written by the watchdog: (step start, blocking stack, location) taken mid-step.
        self.sample: tuple[float, list[str], str | None] | None = None
        #: The loop thread's registration with the GIL reader while the loop runs (-1 when
        #: none), and the last of its captures the watchdog has dealt with.
        self.gil_handle = -1
        self.gil_seen = 0
        self.max_locations = options.max_locations
        #: The loop's own class, where :meth:`patch` puts what it replaces (see
        #: ``_own_class``); None until the first patch, or when the loop can't take one.
        self._class: OwnClass | None = None
        self._class_refused = False
        #: Where the hooks record every step, and the watchdog's markers: the step running
        #: now (``current_start``, 0.0 when none) and its callback, read by its thread.
        self.recorder = _hotpath.twin.Recorder(
            self, self.clock, self.threshold, self.busy_from_callbacks, TASK_TYPES
        )
        #: Exemplars, when opentelemetry-api is there to find the steps' spans.
        self.exemplar_sampler: Sampler | None = None
        #: Written by the watchdog: (step start, span ids) of the span current in a slow
        #: step's task while it ran.
        self.step_span: tuple[float, tuple[str, str]] | None = None
        if tracing_installed():
            self.exemplar_sampler = Sampler()
            self._arm_exemplars()
        self._attach(self.fixed_name or threading.current_thread().name)

    def _arm_exemplars(self) -> None:
        """Offer the steps over the exemplar floor once the application has imported
        ``opentelemetry.trace`` (checked here and at every heartbeat): until then no step
        has a span to find, and a service that does not trace pays nothing per step."""
        if self.exemplar_sampler is not None and tracing_api() is not None:
            self.recorder.exemplar_floor = EXEMPLAR_FLOOR
            self.exemplars_armed = True

    #: Whether the recorder offers steps over the exemplar floor (see _arm_exemplars).
    exemplars_armed = False

    # --- labels --------------------------------------------------------------------------

    def _attach(self, name: str) -> None:
        book = self.installation.book
        if self.attached:
            book.detach(self.label, self.key)
        self.label, self.stats = book.attach(name, self.implementation, self.key)
        self.stats.pending = self.recorder
        self.attached = True

    def _detach(self) -> None:
        if self.attached:
            self.attached = False
            self.installation.book.detach(self.label, self.key)

    def _loop_collected(self, _ref: object) -> None:
        # The loop was garbage-collected without close(): keep its figures, drop the probe.
        # This runs wherever the collector runs (any thread, any allocation, loopscope's
        # own locked sections included): nothing here waits for a lock.
        self._gil_unregister()
        self.active = False
        self._detach()
        self.installation.forget(self)

    # --- patching helpers ----------------------------------------------------------------

    #: Whether :meth:`patch` puts the methods on a class of the loop's own: for a loop
    #: whose replaced methods are called from C (uvloop's, by asyncio's C task), not for
    #: one whose own Python code calls them (asyncio's), where a method found on the class
    #: of an object whose attributes live in a dict is not specialized by the interpreter
    #: (+1,100 instructions per task step on asyncio's loop, 3.12).
    methods_on_own_class = False

    def patch(self, loop: AbstractEventLoop, name: str, replacement: object) -> None:
        """Put ``replacement`` where ``loop.name`` finds it, remembering what was there: on
        the loop's own class (``methods_on_own_class``, see ``_own_class``) unless the loop
        has an attribute of that name itself, which would hide it, or its class can't take
        a subclass; else on the loop, with setattr() (which on 3.11 keeps the loop's
        attributes in CPython's inline values, where a write to ``__dict__`` would move
        them to a dict and make every method call on the loop from Python code slower)."""
        previous = _own_attribute(loop, name)
        own = self._own_class(loop) if previous is _MISSING else None
        if own is not None:
            own.put(loop, name, replacement)
            return
        saved = _own_attribute(loop, _SAVED_ATTRS)
        if saved is _MISSING:
            saved = {}
            setattr(loop, _SAVED_ATTRS, saved)
        assert isinstance(saved, dict)
        saved[name] = (previous, replacement)
        setattr(loop, name, replacement)

    def _own_class(self, loop: AbstractEventLoop) -> OwnClass | None:
        if self._class is None and self.methods_on_own_class and not self._class_refused:
            try:
                self._class = OwnClass(loop)
            except TypeError:
                self._class_refused = True
        return self._class

    def patch_lifecycle(self, loop: AbstractEventLoop) -> None:
        """Hook task creation, the start and end of run_forever, and close()."""
        probe = self
        orig_run_forever = loop.run_forever
        orig_close = loop.close
        orig_create_task = loop.create_task

        def start() -> bool:
            """Whether this run is measured (then stop() follows it)."""
            if loop.is_running() or loop.is_closed() or not probe.active:
                return False
            try:
                probe.on_run_start(loop)
            except Exception as exc:
                probe.fault(exc)
                return False
            return True

        def stop() -> None:
            try:
                probe.on_run_stop()
            except Exception as exc:
                probe.fault(exc)

        def close() -> None:
            if probe.loop_ref() is None:
                # The loop is being collected unclosed, and its __del__ closes it.  The
                # hooks put it in a reference cycle, so the cyclic GC frees it together
                # with what only it refers to, in no set order: its own close may find its
                # self-pipe's sockets already finalized.  Without loopscope reference
                # counting would have freed it first.  Its close as far as it goes, quietly.
                with contextlib.suppress(Exception):
                    orig_close()
                return
            orig_close()
            if loop.is_closed() and probe.active:
                try:
                    probe.on_close()
                except Exception as exc:
                    probe.fault(exc)

        self.patch(loop, "create_task", _hotpath.twin.CreateTask(orig_create_task, self.recorder))
        self.patch(loop, "run_forever", _hotpath.twin.RunForever(start, orig_run_forever, stop))
        self.patch(loop, "close", close)
        for hook in self.installation.loop_hooks:
            hook(self, loop)

    def unpatch_all(self, loop: AbstractEventLoop) -> None:
        """Undo every :meth:`patch`."""
        if self._class is not None:
            self._class.remove(loop)
            self._class = None
        saved = _own_attribute(loop, _SAVED_ATTRS)
        if not isinstance(saved, dict):
            return
        for name, (previous, replacement) in saved.items():
            if _own_attribute(loop, name) is not replacement:
                continue  # set again since (another tool's wrapper): left as it is
            if previous is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(loop, name)
            else:
                setattr(loop, name, previous)
        with contextlib.suppress(AttributeError):
            delattr(loop, _SAVED_ATTRS)

    # --- hot path ------------------------------------------------------------------------

    def offer_exemplar(self, callback: object, task: object, start: float, duration: float) -> None:
        """A task step at or over the exemplar floor, under the slow threshold."""
        self._exemplar(task, duration, (bisect_left(BUCKETS, duration),))

    def note_span(self, start: float, callback: object) -> None:
        """From the watchdog, while a long step that started at ``start`` runs: note the
        span current in its task (the step may end it before it returns)."""
        trace_api = tracing_api()
        if self.exemplar_sampler is None or trace_api is None:
            return
        task = getattr(callback, "__self__", None)
        if not isinstance(task, TASK_TYPES):
            return
        try:
            ids = span_ids(trace_api, task)
        except Exception:
            return  # the task changed under us: no exemplar from this look
        if ids is not None:
            self.step_span = (start, ids)

    def _exemplar(
        self, task: object, duration: float, keys: tuple[int, ...], start: float = 0.0
    ) -> None:
        sampler = self.exemplar_sampler
        if sampler is None or task is None:
            return
        noted = self.step_span
        seen = noted[1] if noted is not None and noted[0] == start else None
        try:
            sampler.offer(self.stats.exemplars, keys, task, duration, seen)
        except Exception as exc:
            # Never the application's concern: no more exemplars from this loop.
            self.exemplar_sampler = None
            self.installation.report_fault("taking an exemplar", exc)

    def record_slow(self, callback: object, task: object, start: float, duration: float) -> None:
        """Count a slow step, by location too, and report it with the stack the watchdog
        took while it ran (if it had the time to)."""
        stats = self.stats
        stats.slow_callbacks += 1
        stats.blocked_seconds += duration
        self._exemplar(task, duration, (bisect_left(BUCKETS, duration), SLOW), start)
        stack, location = self._captured_stack(callback, task, start, duration)
        sample = self.sample
        if sample is not None and sample[0] == start:
            stack, location = sample[1], sample[2]
        self.sample = None
        stats.count_location(location or UNKNOWN_LOCATION, self.max_locations)
        self.events.slow_callback(
            self.label,
            duration,
            self.threshold,
            callback,
            task,
            started=start,
            blocking_stack=stack,
            location=location,
        )

    def _captured_stack(
        self, callback: object, task: object, start: float, duration: float
    ) -> tuple[list[str], str | None]:
        """The stack the GIL reader took during the step that ran from ``start`` for
        ``duration`` (it held the GIL in one C call).  The watchdog is handed the captures
        it has not seen, to report the block: also when it sampled the step earlier (a
        stretch that held the GIL before the call, or the thread descheduled by a busy
        machine, can give it a sample younger than its first report)."""
        taken = [
            capture
            for capture in _gilreader.captures(self.gil_handle, 0)
            if capture.step_start == start
            or (not capture.step_start and start <= capture.captured_at <= start + duration)
        ]
        for capture in taken:
            if capture.seq > self.gil_seen:
                self.installation.report_block_later(self, capture, callback, task)
        # The first taken at half the threshold or later, as the watchdog's own sample.
        sampled = [c for c in taken if c.captured_at - start >= self.threshold / 2]
        if not sampled:
            return [], None
        return sampled[0].stack, application_location(sampled[0].stack)

    # --- run / stop ----------------------------------------------------------------------

    def on_run_start(self, loop: AbstractEventLoop) -> None:
        """The loop starts running in the current thread."""
        self.thread_id = threading.get_ident()
        if self.fixed_name is None:
            name = threading.current_thread().name
            if name != self.label:
                self._attach(name)
        self.busy_mark = self.clock()
        self.recorder.chain_end = 0.0  # no step starts where one of an earlier run ended
        self.start_heartbeat(loop)
        self._gil_register()

    def on_run_stop(self) -> None:
        """The loop stops running: time outside run_forever is neither busy nor lag."""
        self._gil_unregister()
        self.stop_heartbeat()
        self.settle_busy()
        self.busy_mark = None
        self.recorder.chain_end = 0.0

    def _gil_register(self) -> None:
        """Let the GIL reader read this thread's stack while the loop runs (its captures'
        times are time.monotonic()'s: only with that clock)."""
        self._gil_unregister()
        if self.clock is time.monotonic:
            self.gil_handle = _gilreader.register(self.recorder, self.label)

    def _gil_unregister(self) -> None:
        handle, self.gil_handle = self.gil_handle, -1
        _gilreader.unregister(handle)

    def settle_busy(self) -> None:
        """Add the busy time since ``busy_mark`` (wall time, less any time known to be idle)
        and move the mark to now.  Called from the loop's thread."""
        if self.busy_mark is not None and not self.busy_from_callbacks:
            now = self.clock()
            self.stats.busy_seconds += now - self.busy_mark
            self.busy_mark = now

    def on_beat(self) -> None:
        """Called at each heartbeat, from the loop's thread."""

    def schedule_raw(
        self, loop: AbstractEventLoop, delay: float, callback: Callable[[], None]
    ) -> TimerHandle:
        """Schedule loopscope's own timer, bypassing the measurement hooks."""
        raise NotImplementedError

    def start_heartbeat(self, loop: AbstractEventLoop) -> None:
        """Arm the lag probe."""
        self.stop_heartbeat()
        if not self.exemplars_armed:
            self._arm_exemplars()
        if isinstance(loop, BaseEventLoop) and type(loop).time is not BaseEventLoop.time:
            return  # a simulated clock (asyncio's test loops): no lag, and no foreign timer
        self.heartbeat_due = loop.time() + self.lag_interval
        self.heartbeat = self.schedule_raw(loop, self.lag_interval, self._beat)

    def stop_heartbeat(self) -> None:
        """Disarm the lag probe (from the loop's thread, or while the loop is stopped)."""
        if self.heartbeat is not None:
            self.heartbeat.cancel()
            self.heartbeat = None

    def _beat(self) -> None:
        # Not measured: the step after it does not start where the one before it ended.
        self.recorder.chain_end = 0.0
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
            if not self.exemplars_armed:
                self._arm_exemplars()
            self.on_beat()
        except Exception as exc:
            self.fault(exc)

    # --- life cycle ----------------------------------------------------------------------

    def install_hooks(self, loop: AbstractEventLoop) -> None:
        """Patch ``loop`` (implemented per loop kind)."""
        raise NotImplementedError

    def remove_hooks(self, loop: AbstractEventLoop) -> None:
        """Undo :meth:`install_hooks` (implemented per loop kind), and let go of whatever
        refers to the loop: the probe is in a reference cycle with its recorder, and
        through it would keep a closed loop alive until the cyclic GC runs."""
        self.unpatch_all(loop)

    def on_close(self) -> None:
        """The loop was closed: fold its figures into its label and let it go."""
        loop = self.loop_ref()
        self._gil_unregister()
        self.active = False
        self.heartbeat = None
        if loop is not None:
            self.remove_hooks(loop)
        self._detach()
        self.installation.forget(self)

    def remove(self) -> None:
        """Take the instrumentation off the loop (uninstall, or a fault)."""
        loop = self.loop_ref()
        self._gil_unregister()
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
            self.settle_busy()
            self.busy_mark = None
        self._detach()
        self.installation.forget(self)

    def fault(self, exc: BaseException) -> None:
        """An error in loopscope's own bookkeeping: report it once, stop measuring this loop."""
        self.installation.report_fault(f"measuring loop {self.label!r}", exc)
        try:
            self.remove()
        except Exception as second:
            logger().error("loopscope: could not remove instrumentation: %r", second)


def _in_loop_thread(loop: Any) -> bool:
    import asyncio

    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
