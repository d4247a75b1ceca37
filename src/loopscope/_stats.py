"""Per-loop counters and histograms, written by the loop thread and read at scrape time.

The loop thread is the only writer of a :class:`LoopStats`; a scrape reads it from another
thread without a lock.  Histogram buckets are stored per bucket (not cumulative) and the
count is derived from them at scrape time, so an exposition is always self-consistent.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "BUCKETS",
    "EXEMPLAR_WINDOW",
    "Histogram",
    "LabelSeries",
    "LoopStats",
    "SeriesBook",
    "StepExemplar",
    "newer_or_slower",
]

#: Upper bounds in seconds, 10 microseconds to 10 seconds in 1-2.5-5 steps.
BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005,
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0,
)  # fmt: skip

#: Seconds for which a kept exemplar counts as recent: a slower step replaces it at once, any
#: step with a span replaces it after that.
EXEMPLAR_WINDOW = 15.0
#: Label value used once the number of distinct values reaches its cap.
OVERFLOW_LABEL = "other"
#: Location of a slow step that ended before the watchdog could sample its stack.
UNKNOWN_LOCATION = "unknown"


@dataclass
class Histogram:
    """Observations per bucket of :data:`BUCKETS` (the last slot is +Inf) and their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def add(self, other: Histogram) -> None:
        """Fold ``other`` into this histogram."""
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.total += other.total

    def copy(self) -> Histogram:
        """A snapshot of this histogram."""
        return Histogram(list(self.counts), self.total)


@dataclass(frozen=True)
class StepExemplar:
    """One step's trace: ids in lowercase hex, its duration (seconds) and when it ended
    (seconds since the epoch)."""

    trace_id: str
    span_id: str
    duration: float
    timestamp: float


def newer_or_slower(kept: StepExemplar, other: StepExemplar) -> StepExemplar:
    """Which of two exemplars for the same series to show: the slower of the two unless one
    is more than ``EXEMPLAR_WINDOW`` older than the other."""
    if abs(kept.timestamp - other.timestamp) > EXEMPLAR_WINDOW:
        return kept if kept.timestamp > other.timestamp else other
    return kept if kept.duration >= other.duration else other


class PendingFigures(Protocol):
    """Figures kept outside a :class:`LoopStats`: the C accelerator's recorder."""

    def flush(self, stats: LoopStats, /) -> None:
        """Add the figures kept so far into ``stats`` and reset them."""


@dataclass
class LoopStats:
    """Everything measured on one loop.  Durations are in seconds."""

    callback_duration: Histogram = field(default_factory=Histogram)
    schedule_delay: Histogram = field(default_factory=Histogram)
    lag: Histogram = field(default_factory=Histogram)
    busy_seconds: float = 0.0
    task_steps: int = 0
    slow_callbacks: int = 0
    blocked_seconds: float = 0.0
    tasks_created: int = 0
    slow_locations: dict[str, int] = field(default_factory=dict)
    #: Exemplars of traced steps, per callback-duration bucket index and for the slow-step
    #: counter (key ``_exemplars.SLOW``); written by the loop's thread only.
    exemplars: dict[int, StepExemplar] = field(default_factory=dict, compare=False)
    #: With the C accelerator, the recorder whose figures belong here until flushed.
    pending: PendingFigures | None = field(default=None, compare=False, repr=False)

    def sync(self) -> None:
        """Fold in the figures the C accelerator still keeps (from any thread: flush() runs
        no Python code, and the C path is the only writer of the fields it folds)."""
        if self.pending is not None:
            self.pending.flush(self)

    def count_location(self, location: str, cap: int) -> None:
        """Count one slow step at ``location``; past ``cap`` distinct ones, as ``other``."""
        locations = self.slow_locations
        if location not in locations and len(locations) >= cap:
            location = OVERFLOW_LABEL
        locations[location] = locations.get(location, 0) + 1

    def add(self, other: LoopStats, location_cap: int = 1_000_000) -> None:
        """Fold ``other`` into these figures."""
        self.callback_duration.add(other.callback_duration)
        self.schedule_delay.add(other.schedule_delay)
        self.lag.add(other.lag)
        self.busy_seconds += other.busy_seconds
        self.task_steps += other.task_steps
        self.slow_callbacks += other.slow_callbacks
        self.blocked_seconds += other.blocked_seconds
        self.tasks_created += other.tasks_created
        for location, count in list(other.slow_locations.items()):
            if location not in self.slow_locations and len(self.slow_locations) >= location_cap:
                location = OVERFLOW_LABEL
            self.slow_locations[location] = self.slow_locations.get(location, 0) + count
        for key, exemplar in list(other.exemplars.items()):
            kept = self.exemplars.get(key)
            self.exemplars[key] = exemplar if kept is None else newer_or_slower(kept, exemplar)

    def copy(self) -> LoopStats:
        """A snapshot of these figures."""
        return LoopStats(
            self.callback_duration.copy(),
            self.schedule_delay.copy(),
            self.lag.copy(),
            self.busy_seconds,
            self.task_steps,
            self.slow_callbacks,
            self.blocked_seconds,
            self.tasks_created,
            dict(self.slow_locations),
            dict(self.exemplars),
        )


class LabelSeries:
    """All loops that share one ``loop`` label value.

    Loops that are still open contribute their live :class:`LoopStats`; a closed loop's
    figures are folded into ``retired`` so that counters never go backwards and nothing
    per loop is kept once the loop is gone.
    """

    def __init__(self, implementation: str) -> None:
        self.implementations: set[str] = {implementation}
        self.retired = LoopStats()
        self.live: dict[int, LoopStats] = {}

    def snapshot(self, location_cap: int) -> LoopStats:
        """The sum over retired and live loops (call with the book's lock held)."""
        total = self.retired.copy()
        for stats in list(self.live.values()):
            stats.sync()
            total.add(stats, location_cap)
        return total


class SeriesBook:
    """The label series of one installation, with a cap on distinct ``loop`` labels."""

    def __init__(self, max_labels: int, max_locations: int) -> None:
        self.max_labels = max_labels
        self.max_locations = max_locations
        self.lock = threading.Lock()
        self.series: dict[str, LabelSeries] = {}
        #: Loops detached and not folded yet: (label, key), folded under the lock.
        self.detached: deque[tuple[str, int]] = deque()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock, with every loop detached so far folded into its series: what
        reads or changes the series does it this way."""
        with self.lock:
            self._fold_detached()
            yield

    def attach(self, label: str, implementation: str, key: int) -> tuple[str, LoopStats]:
        """Register a loop under ``label``; return the label it got and the stats it writes."""
        with self.locked():
            if label not in self.series and len(self.series) >= self.max_labels:
                label = OVERFLOW_LABEL
            series = self.series.get(label)
            if series is None:
                series = self.series[label] = LabelSeries(implementation)
            series.implementations.add(implementation)
            stats = LoopStats()
            series.live[key] = stats
            return label, stats

    def detach(self, label: str, key: int) -> None:
        """Fold a finished loop's figures into its series and forget the loop: now if the
        lock is free, else at the lock's next use.  Never waits, so that it can be called
        from anywhere, a weak reference's callback included: the garbage collector runs
        those wherever it runs, in any thread, also inside a section holding the lock."""
        self.detached.append((label, key))
        if self.lock.acquire(blocking=False):
            try:
                self._fold_detached()
            finally:
                self.lock.release()

    def _fold_detached(self) -> None:
        """Fold the loops detached so far (with the lock held)."""
        while self.detached:
            label, key = self.detached.popleft()
            series = self.series.get(label)
            if series is not None and key in series.live:
                stats = series.live.pop(key)
                stats.sync()
                series.retired.add(stats, self.max_locations)
