"""OpenTelemetry instruments for every figure the Prometheus collector exports.

Imported only when OpenTelemetry export is turned on (option ``otel``, or the
instrumentor under ``opentelemetry-instrument``): it needs ``opentelemetry-api``, and
``opentelemetry-sdk`` for the histograms.  It reads the same :class:`Figures` the
Prometheus collector reads, at collection time: counters and gauges are asynchronous
instruments whose callbacks report the figures as they are; the histograms, which the API
can only be told about value by value, are handed the buckets counted since the previous
collection through :mod:`._otel_feed`.  Nothing runs on the measured loops' threads.

The names follow OpenTelemetry's semantic conventions where these have one
(``process.context_switches``) and else live under loopscope's own namespace, shaped after
Node.js's runtime conventions (``nodejs.eventloop.delay``, ``nodejs.eventloop.time`` with a
``state`` attribute): ``python.*`` and ``cpython.*`` belong to the conventions themselves.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from ._exposition import Figures
from ._otel_feed import BucketFeed
from ._stats import BUCKETS, Histogram

__all__ = ["INSTRUMENTS", "LOOP", "OtelExport", "OtelInstrument", "export_to"]

#: Attribute keys.
LOOP = "loopscope.loop.name"
IMPLEMENTATION = "loopscope.loop.implementation"
EXECUTOR = "loopscope.executor.name"
LOCATION = "loopscope.location"
STATE = "loopscope.eventloop.state"
SWITCH_TYPE = "process.context_switch.type"
RUNTIME_VERSION = "process.runtime.version"


@dataclass(frozen=True)
class OtelInstrument:
    """One OpenTelemetry instrument and the Prometheus family it mirrors."""

    name: str
    kind: str  # histogram, counter, updowncounter or gauge
    unit: str
    prometheus: str
    attributes: tuple[str, ...]
    description: str


_LOOP_HISTOGRAMS = {
    "loopscope.eventloop.callback.duration": (
        "callback_duration",
        "asyncio_loop_callback_duration_seconds",
        "Duration of each callback and task step the loop ran.",
    ),
    "loopscope.eventloop.callback.schedule_delay": (
        "schedule_delay",
        "asyncio_loop_schedule_delay_seconds",
        "Time from a callback becoming runnable to it starting.",
    ),
    "loopscope.eventloop.delay": (
        "lag",
        "asyncio_loop_lag_seconds",
        "How late the heartbeat timer fired while the loop ran.",
    ),
}
_EXECUTOR_HISTOGRAMS = {
    "loopscope.executor.queue_delay": (
        "queue_delay",
        "asyncio_executor_queue_delay_seconds",
        "Time a run_in_executor call waited for a free executor worker.",
    ),
    "loopscope.executor.run.duration": (
        "run_duration",
        "asyncio_executor_run_duration_seconds",
        "Time a run_in_executor call ran in an executor worker.",
    ),
}
#: Loop counters: name -> (LoopStats attribute, unit, Prometheus family, description).
_LOOP_COUNTERS = {
    "loopscope.eventloop.time": (
        "busy_seconds",
        "s",
        "asyncio_loop_busy_seconds_total",
        "Time the loop spent running rather than waiting for I/O (state active).",
    ),
    "loopscope.eventloop.task.steps": (
        "task_steps",
        "{step}",
        "asyncio_loop_task_steps_total",
        "Task steps (the loop's context switches) run.",
    ),
    "loopscope.eventloop.slow_steps": (
        "slow_callbacks",
        "{step}",
        "asyncio_loop_slow_callbacks_total",
        "Callbacks and task steps that ran at or over the slow threshold.",
    ),
    "loopscope.eventloop.blocked_time": (
        "blocked_seconds",
        "s",
        "asyncio_loop_blocked_seconds_total",
        "Time spent in slow callbacks and task steps.",
    ),
    "loopscope.eventloop.task.created": (
        "tasks_created",
        "{task}",
        "asyncio_tasks_created_total",
        "Tasks created through loop.create_task.",
    ),
}


def _table() -> tuple[OtelInstrument, ...]:
    out = [
        OtelInstrument(name, "histogram", "s", prom, (LOOP,), doc)
        for name, (_attr, prom, doc) in _LOOP_HISTOGRAMS.items()
    ]
    for name, (attr, unit, prom, doc) in _LOOP_COUNTERS.items():
        keys = (LOOP, STATE) if attr == "busy_seconds" else (LOOP,)
        out.append(OtelInstrument(name, "counter", unit, prom, keys, doc))
    out += [
        OtelInstrument(
            "loopscope.eventloop.slow_steps_by_location",
            "counter",
            "{step}",
            "asyncio_loop_slow_callbacks_by_location_total",
            (LOOP, LOCATION),
            "Slow steps by the application line that blocked (capped; overflow is 'other').",
        ),
        OtelInstrument(
            "loopscope.eventloop.task.active",
            "updowncounter",
            "{task}",
            "asyncio_tasks",
            (LOOP,),
            "Tasks alive (not done) on the loop now.",
        ),
        OtelInstrument(
            "loopscope.eventloop.info",
            "gauge",
            "1",
            "asyncio_loop_info",
            (LOOP, IMPLEMENTATION, RUNTIME_VERSION),
            "Loop implementation and Python version, value 1.",
        ),
        OtelInstrument(
            "process.context_switches",
            "counter",
            "{context_switch}",
            "process_context_switches_total",
            (SWITCH_TYPE,),
            "Number of times the process has been context switched.",
        ),
    ]
    out += [
        OtelInstrument(name, "histogram", "s", prom, (LOOP, EXECUTOR), doc)
        for name, (_attr, prom, doc) in _EXECUTOR_HISTOGRAMS.items()
    ]
    out += [
        OtelInstrument(
            "loopscope.executor.workers.busy",
            "updowncounter",
            "{worker}",
            "asyncio_executor_workers_busy",
            (LOOP, EXECUTOR),
            "Executor workers running a call now.",
        ),
        OtelInstrument(
            "loopscope.executor.workers.max",
            "updowncounter",
            "{worker}",
            "asyncio_executor_workers_max",
            (LOOP, EXECUTOR),
            "Maximum number of workers of the executors in use.",
        ),
    ]
    return tuple(out)


#: Every instrument, in the order they are made (and documented).
INSTRUMENTS: tuple[OtelInstrument, ...] = _table()

_Points = Iterable[tuple[float | int, dict[str, str]]]


def _version() -> str:
    try:
        return importlib.metadata.version("loopscope")
    except importlib.metadata.PackageNotFoundError:
        return "0"


#: The export made on each provider.  The SDK hands back the instruments already made
#: when asked for the same names again (with the callbacks they were made with), so a
#: later installation attaches to the export of its provider rather than making its own.
_exports: weakref.WeakKeyDictionary[Any, OtelExport] = weakref.WeakKeyDictionary()
_exports_lock = threading.Lock()


def export_to(
    meter_provider: Any,
    read_figures: Callable[[], Figures],
    report_fault: Callable[[str, BaseException], None],
) -> OtelExport:
    """loopscope's instruments on ``meter_provider`` (None: the global provider), reporting
    the figures ``read_figures`` returns from now on."""
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    with _exports_lock:
        export = _made_on(provider)
        if export is None:
            export = OtelExport(provider)
            with contextlib.suppress(TypeError):
                _exports[provider] = export
        export.attach(read_figures, report_fault)
    return export


def _made_on(provider: Any) -> OtelExport | None:
    """The export made on ``provider``, or on the API's proxy for the global provider
    before ``provider`` was set as the global one (its instruments are ``provider``'s)."""
    for made_on, export in list(_exports.items()):
        if made_on is provider or getattr(made_on, "_real_meter_provider", None) is provider:
            return export
    return None


def _no_figures() -> Figures:
    return Figures()


def _no_report(where: str, exc: BaseException) -> None:
    pass


class OtelExport:
    """loopscope's instruments on one ``MeterProvider``, fed from the figures of the
    installation attached to them, if any."""

    def __init__(self, provider: Any) -> None:
        self.read_figures: Callable[[], Figures] = _no_figures
        self.report_fault: Callable[[str, BaseException], None] = _no_report
        self.stopped = True
        self.figures = Figures()
        self._lock = threading.Lock()
        #: Per (instrument name, attributes): the cumulative histogram already handed over.
        self._handed: dict[tuple[str, tuple[tuple[str, str], ...]], Histogram] = {}
        self._histograms_on = True
        meter = provider.get_meter("loopscope", _version())
        self._feeds: dict[str, BucketFeed] = {}
        points: dict[str, Callable[[Figures], _Points]] = {
            "loopscope.eventloop.slow_steps_by_location": _by_location,
            "loopscope.eventloop.task.active": _tasks_alive,
            "loopscope.eventloop.info": _loop_info,
            "process.context_switches": _context_switches,
            "loopscope.executor.workers.busy": lambda f: _executor_gauge(f, "busy"),
            "loopscope.executor.workers.max": lambda f: _executor_gauge(f, "maximum"),
        }
        for name, (attr, *_rest) in _LOOP_COUNTERS.items():
            points[name] = _loop_counter(attr)
        first = True
        for spec in INSTRUMENTS:
            if spec.kind == "histogram":
                histogram = meter.create_histogram(
                    spec.name,
                    unit=spec.unit,
                    description=spec.description,
                    explicit_bucket_boundaries_advisory=list(BUCKETS),
                )
                self._feeds[spec.name] = BucketFeed(histogram, BUCKETS)
                continue
            callback = self._callback(points[spec.name], refresh=first)
            first = False
            make = {
                "counter": meter.create_observable_counter,
                "updowncounter": meter.create_observable_up_down_counter,
                "gauge": meter.create_observable_gauge,
            }[spec.kind]
            make(spec.name, [callback], unit=spec.unit, description=spec.description)

    def attach(
        self,
        read_figures: Callable[[], Figures],
        report_fault: Callable[[str, BaseException], None],
    ) -> None:
        """Report the figures ``read_figures`` returns, all of them new to the instruments."""
        with self._lock:
            self.read_figures = read_figures
            self.report_fault = report_fault
            self._handed.clear()
            self._histograms_on = True
            self.stopped = False

    def stop(self) -> None:
        """Report nothing from now on (the API cannot take instruments back)."""
        with self._lock:
            self.stopped = True
            self.read_figures = _no_figures
            self.figures = Figures()

    def _callback(
        self, points: Callable[[Figures], _Points], *, refresh: bool
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            if self.stopped:
                return []
            try:
                if refresh:
                    # The first instrument's callback runs first in every collection: it
                    # reads the figures once for all of them and hands the histograms over.
                    self.refresh()
                return [Observation(value, keys) for value, keys in points(self.figures)]
            except Exception as exc:
                self.report_fault("reporting OpenTelemetry metrics", exc)
                return []

        return callback

    def refresh(self) -> None:
        """Read the figures and hand the histograms what they gained since the last time."""
        with self._lock:
            if self.stopped:
                return
            figures = self.read_figures()
            self.figures = figures
            if not self._histograms_on:
                return
            try:
                for name, label, hist in _histograms(figures):
                    self._hand_over(name, label, hist)
            except Exception as exc:
                # Counters and gauges go on; the histograms stop (FeedUnavailable: not an
                # SDK this module knows).
                self._histograms_on = False
                self.report_fault("handing histograms to OpenTelemetry", exc)

    def _hand_over(self, name: str, attributes: dict[str, str], hist: Histogram) -> None:
        feed = self._feeds[name]
        feed.check()
        key = (name, tuple(sorted(attributes.items())))
        before = self._handed.get(key)
        counts = list(hist.counts)
        total = hist.total
        if before is not None:
            counts = [now - then for now, then in zip(hist.counts, before.counts, strict=True)]
            total = hist.total - before.total
            if any(count < 0 for count in counts):  # figures started again: take them as new
                counts, total = list(hist.counts), hist.total
        feed.add(attributes, counts, total)
        self._handed[key] = hist.copy()


def _histograms(figures: Figures) -> Iterator[tuple[str, dict[str, str], Histogram]]:
    for label, stats in figures.loops.items():
        for name, (attr, *_rest) in _LOOP_HISTOGRAMS.items():
            yield name, {LOOP: label}, getattr(stats, attr)
    for (loop_label, executor), executor_figures in figures.executors:
        for name, (attr, *_rest) in _EXECUTOR_HISTOGRAMS.items():
            yield name, {LOOP: loop_label, EXECUTOR: executor}, getattr(executor_figures, attr)


def _loop_counter(attr: str) -> Callable[[Figures], _Points]:
    def points(figures: Figures) -> _Points:
        for label, stats in figures.loops.items():
            attributes = {LOOP: label}
            if attr == "busy_seconds":
                attributes[STATE] = "active"
            yield getattr(stats, attr), attributes

    return points


def _by_location(figures: Figures) -> _Points:
    for label, stats in figures.loops.items():
        for location, count in sorted(stats.slow_locations.items()):
            yield count, {LOOP: label, LOCATION: location}


def _tasks_alive(figures: Figures) -> _Points:
    for label in figures.loops:
        yield figures.tasks_alive.get(label, 0), {LOOP: label}


def _loop_info(figures: Figures) -> _Points:
    version = platform.python_version()
    for label, kinds in figures.implementations.items():
        for kind in sorted(kinds):
            yield 1, {LOOP: label, IMPLEMENTATION: kind, RUNTIME_VERSION: version}


def _context_switches(figures: Figures) -> _Points:
    if figures.context_switches is not None:
        voluntary, involuntary = figures.context_switches
        yield voluntary, {SWITCH_TYPE: "voluntary"}
        yield involuntary, {SWITCH_TYPE: "involuntary"}


def _executor_gauge(figures: Figures, attr: str) -> _Points:
    for (loop_label, executor), executor_figures in figures.executors:
        yield getattr(executor_figures, attr), {LOOP: loop_label, EXECUTOR: executor}
