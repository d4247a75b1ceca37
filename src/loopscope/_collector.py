"""prometheus_client Collector: turns the recorded figures into metric families at scrape time.

Nothing here runs on the loop's thread; a scrape reads the loop's counters without a lock
(each read of an int or float is atomic) and takes the book's lock only to walk the labels.
"""

from __future__ import annotations

import asyncio
import platform
import resource
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ._stats import BUCKETS, Histogram, LoopStats

if TYPE_CHECKING:
    from ._installation import Installation

__all__ = ["LoopCollector"]

_BUCKET_NAMES: list[str] = [floatToGoString(b) for b in BUCKETS]  # type: ignore[no-untyped-call]


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


def _count_alive(loop: asyncio.AbstractEventLoop) -> int:
    # all_tasks() retries by itself when the loop thread changes the task set meanwhile.
    return len(asyncio.all_tasks(loop))


class LoopCollector(Collector):
    """Builds the ``asyncio_*`` and ``process_context_switches_total`` families."""

    def __init__(self, installation: Installation) -> None:
        self.installation = installation

    def describe(self) -> Iterable[Metric]:
        # Describing by collecting would read live loops at registration time; names suffice.
        return list(self._families({}, {}, {}))

    def collect(self) -> Iterable[Metric]:
        try:
            snapshots, implementations, alive = self._read()
        except Exception as exc:
            self.installation.report_fault("collecting loop metrics", exc)
            return []
        return list(self._families(snapshots, implementations, alive))

    def _read(self) -> tuple[dict[str, LoopStats], dict[str, set[str]], dict[str, int]]:
        book = self.installation.book
        with book.lock:
            snapshots = {label: s.snapshot(book.max_locations) for label, s in book.series.items()}
            implementations = {label: set(s.implementations) for label, s in book.series.items()}
        alive: dict[str, int] = {}
        for probe in self.installation.live_probes():
            loop = probe.loop_ref()
            if loop is None or loop.is_closed():
                continue
            try:
                count = _count_alive(loop)
            except Exception:
                continue
            alive[probe.label] = alive.get(probe.label, 0) + count
        return snapshots, implementations, alive

    def _families(
        self,
        snapshots: dict[str, LoopStats],
        implementations: dict[str, set[str]],
        alive: dict[str, int],
    ) -> Iterator[Metric]:
        labels = ["loop"]
        histograms = {
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
        for name, (doc, attr) in histograms.items():
            family = HistogramMetricFamily(name, doc, labels=labels)
            for label, stats in snapshots.items():
                hist: Histogram = getattr(stats, attr)
                family.add_metric([label], bucket_samples(hist), hist.total)
            yield family

        counters = {
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
        for name, (doc, attr) in counters.items():
            counter = CounterMetricFamily(name, doc, labels=labels)
            for label, stats in snapshots.items():
                counter.add_metric([label], float(getattr(stats, attr)))
            yield counter

        by_location = CounterMetricFamily(
            "asyncio_loop_slow_callbacks_by_location",
            "Slow steps by the application line that blocked (capped; overflow is 'other').",
            labels=["loop", "location"],
        )
        for label, stats in snapshots.items():
            for location, count in sorted(stats.slow_locations.items()):
                by_location.add_metric([label, location], float(count))
        yield by_location

        gauge = GaugeMetricFamily(
            "asyncio_tasks", "Tasks alive (not done) on the loop now.", labels=labels
        )
        for label in snapshots:
            gauge.add_metric([label], float(alive.get(label, 0)))
        yield gauge

        info = GaugeMetricFamily(
            "asyncio_loop_info",
            "Loop implementation and Python version, value 1.",
            labels=["loop", "implementation", "python_version"],
        )
        python_version = platform.python_version()
        for label, kinds in implementations.items():
            for kind in sorted(kinds):
                info.add_metric([label, kind, python_version], 1.0)
        yield info

        switches = CounterMetricFamily(
            "process_context_switches",
            "Context switches of this process, by kind.",
            labels=["kind"],
        )
        usage = resource.getrusage(resource.RUSAGE_SELF)
        switches.add_metric(["voluntary"], float(usage.ru_nvcsw))
        switches.add_metric(["involuntary"], float(usage.ru_nivcsw))
        yield switches
        from ._executor import executor_families  # asyncio_executor_* families

        yield from executor_families(self.installation)
