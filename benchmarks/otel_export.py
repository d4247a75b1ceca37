"""What exporting to OpenTelemetry costs: per collection, and to a loop under a storm.

    python benchmarks/otel_export.py                  # asyncio's loop
    python benchmarks/otel_export.py --loop uvloop --turns 30

Two measurements, in one process, with the OpenTelemetry SDK's in-memory reader (the
exporter's own encoding and sending are the SDK's cost, the same for any instrument):

* ``collect``: the CPU time of one collection of loopscope's instruments, for 1, 10 and 50
  loop labels (each with an executor), with no new steps since the previous collection,
  with 1,000 and with 100,000 new task steps since it; beside it, the time
  prometheus_client takes to build the /metrics text of the same figures.  Histograms are
  handed over per bucket, so the cost should not grow with the number of steps.
* ``storm``: the task-step storm (100 tasks x 200 ``await asyncio.sleep(0)``) on a loop
  made before install() (base) and on an instrumented loop, taken in turns, the
  instrumented one twice: with no OpenTelemetry collection, and with a thread collecting
  every --interval ms (10 ms: 6,000 times more often than the SDK's 60 s default) while
  the turn runs.  CPU time per step of the whole process (the collecting thread
  included), and of the loop's thread alone; the median ratio to base over the turns and
  its quartiles.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest

import loopscope


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def task_storm(tasks: int, steps: int) -> None:
    async def worker() -> None:
        for _ in range(steps):
            await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(tasks)))


async def varied_work() -> None:
    """Steps of several lengths, timers and an executor call: many buckets get counts."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(2, thread_name_prefix="pool") as pool:
        for i in range(200):
            if i % 20 == 0:
                time.sleep(0.0002 * (i // 20))
            await asyncio.sleep(0.0001 if i % 3 == 0 else 0)
        await loop.run_in_executor(pool, time.sleep, 0.001)


def cpu_median(action: Callable[[], object], repeat: int) -> float:
    """Median CPU seconds of one call of ``action``."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        action()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure_collect(kind: str, repeat: int) -> None:
    print(f"collection cost ({kind}): CPU ms per collection, median of {repeat}")
    print(
        f"{'loop labels':>12} {'no new steps':>14} {'1k new steps':>14} "
        f"{'100k new steps':>16} {'/metrics text':>14}"
    )
    for labels in (1, 10, 50):
        registry = CollectorRegistry()
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        loopscope.install(registry=registry, otel=provider, max_loop_labels=100, events="off")
        threads = [
            threading.Thread(target=lambda: new_loop_run(kind, varied_work), name=f"loop-{i}")
            for i in range(labels)
        ]
        for thread in threads:
            thread.start()
            thread.join()
        live = new_loop(kind)
        reader.get_metrics_data()
        idle = cpu_median(reader.get_metrics_data, repeat)

        def after_steps(
            steps: int,
            loop: asyncio.AbstractEventLoop = live,
            reader: InMemoryMetricReader = reader,
        ) -> float:
            loop.run_until_complete(task_storm(100, steps // 100))
            start = time.process_time()
            reader.get_metrics_data()
            return time.process_time() - start

        few = statistics.median(after_steps(1_000) for _ in range(repeat))
        many = statistics.median(after_steps(100_000) for _ in range(max(repeat // 5, 3)))
        text = cpu_median(lambda registry=registry: generate_latest(registry), repeat)
        print(
            f"{labels:>12} {idle * 1e3:>14.2f} {few * 1e3:>14.2f} {many * 1e3:>16.2f} "
            f"{text * 1e3:>14.2f}"
        )
        live.close()
        loopscope.uninstall()
        provider.shutdown()


def new_loop_run(kind: str, work: Callable[[], object]) -> None:
    loop = new_loop(kind)
    try:
        loop.run_until_complete(work())  # type: ignore[arg-type]
    finally:
        loop.close()


def measure_storm(kind: str, turns: int, interval: float) -> None:
    base = new_loop(kind)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    loopscope.install(registry=CollectorRegistry(), otel=provider, events="off")
    measured = new_loop(kind)
    tasks, steps = 100, 200
    collections = [0]

    def turn(name: str) -> tuple[float, float]:
        loop = base if name == "base" else measured
        stop = threading.Event()
        collector = None
        if name == "otel":

            def collect() -> None:
                while not stop.wait(interval):
                    reader.get_metrics_data()
                    collections[0] += 1

            collector = threading.Thread(target=collect)
            collector.start()
        start, own = time.process_time(), time.thread_time()
        loop.run_until_complete(task_storm(tasks, steps))
        cpu, own = time.process_time() - start, time.thread_time() - own
        stop.set()
        if collector is not None:
            collector.join()
        return cpu / (tasks * steps) * 1e9, own / (tasks * steps) * 1e9

    names = ["base", "loopscope", "otel"]
    for name in names:
        turn(name)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    loop_thread: dict[str, list[float]] = {name: [] for name in names}
    for i in range(turns):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            process_ns, thread_ns = turn(name)
            times[name].append(process_ns)
            loop_thread[name].append(thread_ns)
    print(
        f"task-step storm ({kind}), {turns} turns, collection every {interval * 1e3:g} ms "
        f"in the otel turns ({collections[0]} collections)"
    )
    for label, figures in (("process CPU", times), ("loop thread CPU", loop_thread)):
        print(f"  {label}:")
        for name in names:
            ratios = [a / b for a, b in zip(figures[name], figures["base"], strict=True)]
            q1, _median, q3 = statistics.quantiles(ratios, n=4)
            print(
                f"    {name:>10}: {statistics.median(figures[name]):7.0f} ns/step, ratio to "
                f"base {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f})"
            )
    base.close()
    measured.close()
    loopscope.uninstall()
    provider.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--only", choices=["collect", "storm"])
    parser.add_argument("--repeat", type=int, default=25, help="collections per figure")
    parser.add_argument("--turns", type=int, default=20, help="storm turns per variant")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between collections")
    args = parser.parse_args()
    if args.only in (None, "collect"):
        measure_collect(args.loop, args.repeat)
    if args.only in (None, "storm"):
        measure_storm(args.loop, args.turns, args.interval)


if __name__ == "__main__":
    main()
