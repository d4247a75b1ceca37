"""prometheus_client Collector: reads the recorded figures at scrape time and hands them to
``_exposition`` for the families.

Nothing here runs on the loop's thread; a scrape reads the loop's counters without a lock
(each read of an int or float is atomic) and takes the book's lock only to walk the labels.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from ._exposition import ExecutorFigures, Figures, families

if TYPE_CHECKING:
    from ._executor import ExecutorBook
    from ._probe import LoopProbe
    from ._stats import SeriesBook

__all__ = ["LoopCollector"]


def _count_alive(loop: asyncio.AbstractEventLoop) -> int:
    # all_tasks() retries by itself when the loop thread changes the task set meanwhile.
    return len(asyncio.all_tasks(loop))


class LoopCollector(Collector):
    """Builds the ``asyncio_*`` and ``process_context_switches_total`` families of one
    installation: its loops' book, its executor book and its live probes."""

    def __init__(
        self,
        book: SeriesBook,
        executor_book: ExecutorBook,
        live_probes: Callable[[], list[LoopProbe]],
        report_fault: Callable[[str, BaseException], None],
    ) -> None:
        self.book = book
        self.executor_book = executor_book
        self.live_probes = live_probes
        self.report_fault = report_fault

    def describe(self) -> Iterable[Metric]:
        # Describing by collecting would read live loops at registration time; names suffice.
        return list(families(Figures()))

    def collect(self) -> Iterable[Metric]:
        try:
            figures = self.read()
        except Exception as exc:
            self.report_fault("collecting loop metrics", exc)
            return []
        return list(families(figures))

    def read(self) -> Figures:
        """The figures of this process now (the OpenTelemetry export reads them too)."""
        book = self.book
        with book.locked():
            loops = {label: s.snapshot(book.max_locations) for label, s in book.series.items()}
            implementations = {label: set(s.implementations) for label, s in book.series.items()}
        alive: dict[str, int] = {}
        for probe in self.live_probes():
            loop = probe.loop_ref()
            if loop is None or loop.is_closed():
                continue
            try:
                count = _count_alive(loop)
            except Exception:
                continue
            alive[probe.label] = alive.get(probe.label, 0) + count
        usage = resource.getrusage(resource.RUSAGE_SELF)
        executors = [
            (labels, ExecutorFigures(*stats.snapshot()))
            for labels, stats in self.executor_book.items()
        ]
        return Figures(loops, implementations, alive, executors, (usage.ru_nvcsw, usage.ru_nivcsw))
