"""Every Prometheus family loopscope exports, built from figures already read.

The collector (``_collector``) reads the figures (the loops' books, the executor book, the
process's context switches) and hands them here as one :class:`Figures`; this module only
turns numbers into families, so a figure's name, help text and labels are written in one
place.  The multiprocess writers store and merge what the collector returns.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from ._exemplars import SLOW
from ._stats import BUCKETS, Histogram, LoopStats, StepExemplar

__all__ = ["ExecutorFigures", "Figures", "bucket_samples", "families"]

_BUCKET_NAMES: list[str] = [floatToGoString(b) for b in BUCKETS]  # type: ignore[no-untyped-call]

#: Loop histograms: family name -> (help, LoopStats attribute).
_LOOP_HISTOGRAMS = {
    "asyncio_loop_callback_duration_seconds": (
        "Duration of each callback and task step the loop ran, in seconds.",
        "callback_duration",
    ),
    "asyncio_loop_schedule_delay_seconds": (
        "Time from a callback becoming runnable to it starting, in seconds.",
        "schedule_delay",
    ),
    "asyncio_loop_lag_seconds": (
        "How late the heartbeat timer fired while the loop ran, in seconds.",
        "lag",
    ),
}
#: Loop counters: family name (without ``_total``) -> (help, LoopStats attribute).
_LOOP_COUNTERS = {
    "asyncio_loop_busy_seconds": (
        "Seconds the loop spent running callbacks rather than waiting for I/O.",
        "busy_seconds",
    ),
    "asyncio_loop_task_steps": ("Task steps (context switches) run.", "task_steps"),
    "asyncio_loop_slow_callbacks": (
        "Callbacks and task steps that ran at or over the slow threshold.",
        "slow_callbacks",
    ),
    "asyncio_loop_blocked_seconds": (
        "Seconds spent in slow callbacks and task steps.",
        "blocked_seconds",
    ),
    "asyncio_tasks_created": (
        "Tasks created through loop.create_task.",
        "tasks_created",
    ),
}


@dataclass
class ExecutorFigures:
    """What one (loop, executor) label pair shows at one scrape."""

    queue_delay: Histogram
    run_duration: Histogram
    busy: int
    maximum: int


@dataclass
class Figures:
    """Everything one scrape exports.  Empty, it gives the families without samples."""

    #: Per ``loop`` label: the sum over its loops, retired and live.
    loops: dict[str, LoopStats] = field(default_factory=dict)
    #: Per ``loop`` label: the loop implementations seen under it.
    implementations: dict[str, set[str]] = field(default_factory=dict)
    #: Per ``loop`` label: tasks alive now.
    tasks_alive: dict[str, int] = field(default_factory=dict)
    #: Per (``loop``, ``executor``) label pair, sorted.
    executors: list[tuple[tuple[str, str], ExecutorFigures]] = field(default_factory=list)
    #: The process's voluntary and involuntary context switches, when read.
    context_switches: tuple[int, int] | None = None


def bucket_samples(hist: Histogram) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs of ``hist``, +Inf last, for a HistogramMetricFamily."""
    out: list[tuple[str, float]] = []
    running = 0
    for name, count in zip(_BUCKET_NAMES, hist.counts, strict=False):
        running += count
        out.append((name, float(running)))
    running += hist.counts[-1]
    out.append(("+Inf", float(running)))
    return out


def _exemplar(step: StepExemplar | None) -> Exemplar | None:
    if step is None:
        return None
    labels = {"trace_id": step.trace_id, "span_id": step.span_id}
    return Exemplar(labels, step.duration, step.timestamp)


def exemplar_bucket_samples(
    hist: Histogram, exemplars: dict[int, StepExemplar]
) -> list[tuple[str, float] | tuple[str, float, Exemplar]]:
    """:func:`bucket_samples` with each bucket's exemplar, where it has one (OpenMetrics
    shows them; the text format leaves them out)."""
    out: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
    for index, (name, count) in enumerate(bucket_samples(hist)):
        exemplar = _exemplar(exemplars.get(index))
        out.append((name, count) if exemplar is None else (name, count, exemplar))
    return out


def families(figures: Figures) -> Iterator[Metric]:
    """The ``asyncio_*`` and ``process_context_switches_total`` families, in export order."""
    yield from loop_families(figures)
    yield process_family(figures.context_switches)
    yield from executor_families(figures.executors)


def loop_families(figures: Figures) -> Iterator[Metric]:
    """The ``asyncio_loop_*``, ``asyncio_tasks*`` and ``asyncio_loop_info`` families."""
    labels = ["loop"]
    loops = figures.loops
    for name, (doc, attr) in _LOOP_HISTOGRAMS.items():
        family = HistogramMetricFamily(name, doc, labels=labels)
        for label, stats in loops.items():
            hist: Histogram = getattr(stats, attr)
            if attr == "callback_duration" and stats.exemplars:
                family.add_metric(
                    [label], exemplar_bucket_samples(hist, stats.exemplars), hist.total
                )
            else:
                family.add_metric([label], bucket_samples(hist), hist.total)
        yield family

    for name, (doc, attr) in _LOOP_COUNTERS.items():
        counter = CounterMetricFamily(name, doc, labels=labels)
        for label, stats in loops.items():
            exemplar = _exemplar(stats.exemplars.get(SLOW)) if attr == "slow_callbacks" else None
            counter.add_metric([label], float(getattr(stats, attr)), exemplar=exemplar)
        yield counter

    by_location = CounterMetricFamily(
        "asyncio_loop_slow_callbacks_by_location",
        "Slow steps by the application line that blocked (capped; overflow is 'other').",
        labels=["loop", "location"],
    )
    for label, stats in loops.items():
        for location, count in sorted(stats.slow_locations.items()):
            by_location.add_metric([label, location], float(count))
    yield by_location

    gauge = GaugeMetricFamily(
        "asyncio_tasks", "Tasks alive (not done) on the loop now.", labels=labels
    )
    for label in loops:
        gauge.add_metric([label], float(figures.tasks_alive.get(label, 0)))
    yield gauge

    info = GaugeMetricFamily(
        "asyncio_loop_info",
        "Loop implementation and Python version, value 1.",
        labels=["loop", "implementation", "python_version"],
    )
    python_version = platform.python_version()
    for label, kinds in figures.implementations.items():
        for kind in sorted(kinds):
            info.add_metric([label, kind, python_version], 1.0)
    yield info


def process_family(context_switches: tuple[int, int] | None) -> Metric:
    """``process_context_switches_total``: voluntary and involuntary switches."""
    switches = CounterMetricFamily(
        "process_context_switches",
        "Context switches of this process, by kind.",
        labels=["kind"],
    )
    if context_switches is not None:
        voluntary, involuntary = context_switches
        switches.add_metric(["voluntary"], float(voluntary))
        switches.add_metric(["involuntary"], float(involuntary))
    return switches


def executor_families(
    executors: list[tuple[tuple[str, str], ExecutorFigures]],
) -> Iterator[Metric]:
    """The ``asyncio_executor_*`` families."""
    labels = ["loop", "executor"]
    queue_delay = HistogramMetricFamily(
        "asyncio_executor_queue_delay_seconds",
        "Time a run_in_executor call waited for a free executor worker, in seconds.",
        labels=labels,
    )
    run_duration = HistogramMetricFamily(
        "asyncio_executor_run_duration_seconds",
        "Time a run_in_executor call ran in an executor worker, in seconds.",
        labels=labels,
    )
    busy = GaugeMetricFamily(
        "asyncio_executor_workers_busy",
        "Executor workers running a call now.",
        labels=labels,
    )
    maximum = GaugeMetricFamily(
        "asyncio_executor_workers_max",
        "Maximum number of workers of the executors in use.",
        labels=labels,
    )
    for (loop_label, executor), figures in executors:
        pair = [loop_label, executor]
        delay, ran = figures.queue_delay, figures.run_duration
        queue_delay.add_metric(pair, bucket_samples(delay), delay.total)
        run_duration.add_metric(pair, bucket_samples(ran), ran.total)
        busy.add_metric(pair, float(figures.busy))
        maximum.add_metric(pair, float(figures.maximum))
    yield queue_delay
    yield run_duration
    yield busy
    yield maximum
