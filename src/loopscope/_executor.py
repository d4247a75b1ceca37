"""Executor offload: what happens to work a loop hands to ``run_in_executor``.

``loop.run_in_executor`` is shadowed on every instrumented loop (``asyncio.to_thread`` and
``loop.run_in_executor(None, ...)`` go through it too).  For a thread pool the function is
wrapped in a :class:`TimedCall` that runs in the worker thread: it reads the clock when a
worker picks it up (the wait in the executor's queue since the submission) and when it
returns (the run time), and counts the workers busy meanwhile.  Worker threads write these
figures, so each :class:`ExecutorStats` has its own lock.

A process pool (or any executor that is not a ``ThreadPoolExecutor``) receives the caller's
function unchanged, because it must be pickled; there loopscope counts the calls in flight
(submitted and not finished), capped at the pool's size, as the busy workers, and observes
neither the queue wait nor the run time.

Figures are kept per (``loop`` label, ``executor`` label) for the life of the installation,
so loops that share a label add up and counters never go backwards when a loop closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import inspect
import re
import sys
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._stats import BUCKETS, OVERFLOW_LABEL, Histogram

if TYPE_CHECKING:
    from ._probe import LoopProbe

# asyncio's own check: on 3.10 it also knows @asyncio.coroutine functions (removed in 3.11),
# and asyncio.iscoroutinefunction itself is deprecated from 3.14 on.
_is_coroutine_function = (
    asyncio.coroutines.iscoroutinefunction
    if sys.version_info < (3, 11)
    else inspect.iscoroutinefunction
)

__all__ = [
    "DEFAULT_LABEL",
    "ExecutorBook",
    "ExecutorStats",
    "TimedCall",
    "executor_label",
    "hook_loop",
]

#: ``executor`` label of the loop's default executor.
DEFAULT_LABEL = "default"

# ThreadPoolExecutor names its threads "ThreadPoolExecutor-<n>" when given no prefix: a
# counter per instance, which must not become a label value.
_GENERATED_PREFIX = re.compile(r"ThreadPoolExecutor-\d+\Z")


class ExecutorStats:
    """Figures of the executors that share one (loop, executor) label pair."""

    __slots__ = ("busy", "executors", "in_flight", "lock", "queue_delay", "run_duration")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue_delay = Histogram()
        self.run_duration = Histogram()
        #: Calls running now in a thread pool's workers.
        self.busy = 0
        #: Calls submitted and not finished, per executor that is not a thread pool.
        self.in_flight: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        #: The executors seen under this label pair (for their maximum number of workers).
        self.executors: weakref.WeakSet[Any] = weakref.WeakSet()

    def started(self, waited: float) -> None:
        """A worker picked a call up after it waited ``waited`` seconds in the queue."""
        with self.lock:
            self.busy += 1
            hist = self.queue_delay
            hist.counts[bisect_left(BUCKETS, waited)] += 1
            hist.total += waited

    def finished(self, ran: float) -> None:
        """A call returned (or raised) after running ``ran`` seconds."""
        with self.lock:
            self.busy -= 1
            hist = self.run_duration
            hist.counts[bisect_left(BUCKETS, ran)] += 1
            hist.total += ran

    def snapshot(self) -> tuple[Histogram, Histogram, int, int]:
        """Queue delay, run time, busy workers and maximum workers, read consistently."""
        with self.lock:
            queue_delay = self.queue_delay.copy()
            run_duration = self.run_duration.copy()
            busy = self.busy
            executors = list(self.executors)
            in_flight = dict(self.in_flight)
        maximum = 0
        for executor in executors:
            if getattr(executor, "_shutdown", False):
                continue  # shut down: its workers are gone (or going)
            workers = _max_workers(executor)
            maximum += workers
            if executor in in_flight:
                busy += min(in_flight[executor], workers) if workers else in_flight[executor]
        return queue_delay, run_duration, busy, maximum


class ExecutorBook:
    """Every :class:`ExecutorStats` of one installation, with a cap on executor labels
    (``max_executor_labels``)."""

    def __init__(self, max_labels: int) -> None:
        self.max_labels = max_labels
        self.lock = threading.Lock()
        self.stats: dict[tuple[str, str], ExecutorStats] = {}
        self.labels: set[str] = set()

    def get(self, loop_label: str, executor: str) -> ExecutorStats:
        """The figures of one label pair, created on first use."""
        key = (loop_label, executor)
        stats = self.stats.get(key)
        if stats is not None:
            return stats
        with self.lock:
            if executor not in self.labels:
                if len(self.labels) >= self.max_labels:
                    executor = OVERFLOW_LABEL
                self.labels.add(executor)
            key = (loop_label, executor)
            stats = self.stats.get(key)
            if stats is None:
                stats = self.stats[key] = ExecutorStats()
            return stats

    def items(self) -> list[tuple[tuple[str, str], ExecutorStats]]:
        """The label pairs and their figures, sorted."""
        with self.lock:
            return sorted(self.stats.items(), key=lambda item: item[0])

    def after_fork_in_child(self, *, keep_figures: bool) -> None:
        """In a forked child: new locks (a thread of the parent may have held one at the
        fork); without ``keep_figures``, start from zero (the parent's figures are the
        parent's).  Loops alive at the fork keep this book and count into it."""
        self.lock = threading.Lock()
        if not keep_figures:
            self.stats = {}
            self.labels = set()
        for stats in self.stats.values():
            stats.lock = threading.Lock()


def _max_workers(executor: object) -> int:
    workers = getattr(executor, "_max_workers", 0)
    return workers if isinstance(workers, int) and not isinstance(workers, bool) else 0


def executor_label(executor: object) -> str:
    """The ``executor`` label of an executor that is not the loop's default one: its
    ``thread_name_prefix`` when it was given one, else its class name."""
    prefix = getattr(executor, "_thread_name_prefix", None)
    if isinstance(prefix, str) and prefix and not _GENERATED_PREFIX.match(prefix):
        return prefix[:64]
    return type(executor).__name__[:64]


class TimedCall:
    """The function handed to a thread pool: times the wait and the run around the call."""

    __slots__ = ("args", "clock", "func", "stats", "submitted")

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        stats: ExecutorStats,
        clock: Callable[[], float],
    ) -> None:
        self.func = func
        self.args = args
        self.stats = stats
        self.clock = clock
        self.submitted = clock()

    def __call__(self) -> Any:
        clock = self.clock
        stats = self.stats
        start = clock()
        stats.started(max(start - self.submitted, 0.0))
        try:
            return self.func(*self.args)
        finally:
            stats.finished(max(clock() - start, 0.0))

    def __repr__(self) -> str:
        return repr(self.func)


def _is_thread_pool(executor: object) -> bool:
    return isinstance(executor, concurrent.futures.ThreadPoolExecutor)


def _peek_executor(loop: object) -> Any:
    """The default executor a uvloop loop already has, if any: instrumented late (install()
    from inside a running loop), its ``_default_executor`` is only reachable through the
    references the garbage collector sees."""
    try:
        for referent in gc.get_referents(loop):
            if isinstance(referent, concurrent.futures.Executor):
                return referent
    except Exception:
        pass
    return None


def hook_loop(
    book: ExecutorBook,
    report_fault: Callable[[str, BaseException], None],
    probe: LoopProbe,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Shadow ``run_in_executor`` and ``set_default_executor`` on ``loop`` (restored with the
    probe's other patches), counting into ``book``.  One of the installation's loop hooks
    (``Installation.loop_hooks``, bound to its book), called from
    ``LoopProbe.patch_lifecycle``."""
    clock = probe.clock
    orig_run_in_executor = loop.run_in_executor
    orig_set_default_executor = loop.set_default_executor
    base: Any = loop
    # uvloop keeps its default executor where Python cannot read it: remember what is set.
    reads_default = hasattr(base, "_default_executor")
    known_default: list[Any] = [
        getattr(base, "_default_executor", None) if reads_default else _peek_executor(loop)
    ]

    def current_default() -> Any:
        if reads_default:
            return base._default_executor
        executor = known_default[0]
        if executor is None or getattr(executor, "_shutdown", False):
            return None
        return executor

    def set_default_executor(executor: Any) -> None:
        orig_set_default_executor(executor)
        known_default[0] = executor

    def run_in_executor(executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:
        if (
            not probe.active
            or not callable(func)
            or asyncio.iscoroutine(func)
            or _is_coroutine_function(func)
        ):
            # Let the loop raise its own error, or run unmeasured after a fault.
            return orig_run_in_executor(executor, func, *args)
        try:
            if executor is None:
                target = current_default()
                if target is None and not reads_default and not loop.is_closed():
                    # What uvloop would create itself, created here so that it is known.
                    target = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="uvloop")
                    set_default_executor(target)
                label = DEFAULT_LABEL
            else:
                target = executor
                label = DEFAULT_LABEL if executor is current_default() else executor_label(executor)
            stats = book.get(probe.label, label)
        except Exception as exc:
            report_fault("measuring run_in_executor", exc)
            return orig_run_in_executor(executor, func, *args)
        if target is None or _is_thread_pool(target):
            future = orig_run_in_executor(executor, TimedCall(func, args, stats, clock))
            if target is None:
                # asyncio's loop created its default executor just now.
                target = current_default()
            if target is not None:
                with stats.lock:
                    stats.executors.add(target)
            return future
        # Not a thread pool: the function goes through unchanged (it may be pickled).
        future = orig_run_in_executor(executor, func, *args)
        with stats.lock:
            stats.executors.add(target)
            stats.in_flight[target] = stats.in_flight.get(target, 0) + 1

        def done(_future: object) -> None:
            with stats.lock:
                left = stats.in_flight.get(target, 0) - 1
                if left > 0:
                    stats.in_flight[target] = left
                else:
                    stats.in_flight.pop(target, None)

        future.add_done_callback(done)
        return future

    probe.patch(loop, "run_in_executor", run_in_executor)
    probe.patch(loop, "set_default_executor", set_default_executor)
