"""Memory stays flat while an instrumented loop runs millions of callbacks.

    python benchmarks/memory_flat.py                      # 10 million callbacks, asyncio's loop
    python benchmarks/memory_flat.py --loop uvloop --callbacks 2000000

Runs chains of callbacks (each schedules the next with call_soon, a hundred chains at once,
plus a task step every thousand callbacks) and prints the resident set size after every
tenth of the run.  Exits 1 if RSS after the first tenth grew by more than --max-growth-mb.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time

from prometheus_client import CollectorRegistry

import loopscope


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc, else peak RSS)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


def make_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def burst(n: int, chains: int = 100) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = {"n": n}

    def tick() -> None:
        left["n"] -= 1
        if left["n"] <= 0:
            if not done.done():
                done.set_result(None)
        else:
            loop.call_soon(tick)

    for _ in range(chains):
        loop.call_soon(tick)
    await done


async def main(total: int, report_every: int) -> list[tuple[int, float]]:
    points: list[tuple[int, float]] = []
    ran = 0
    while ran < total:
        chunk = min(report_every, total - ran)
        for _ in range(chunk // 1000):
            await burst(1000)  # one task step per thousand callbacks
        ran += chunk
        gc.collect()
        points.append((ran, rss_mb()))
    return points


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callbacks", type=int, default=10_000_000)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--max-growth-mb", type=float, default=5.0)
    args = parser.parse_args(argv)

    loopscope.install(registry=CollectorRegistry(), events="off")
    loop = make_loop(args.loop)
    began = time.perf_counter()
    try:
        points = loop.run_until_complete(main(args.callbacks, max(args.callbacks // 10, 1000)))
    finally:
        loop.close()
    elapsed = time.perf_counter() - began
    print(
        f"{args.callbacks:,} callbacks on {args.loop} in {elapsed:.1f} s "
        f"({args.callbacks / elapsed / 1e6:.2f} M/s), Python {sys.version.split()[0]}"
    )
    print(f"{'callbacks':>12} {'RSS MiB':>9}")
    for ran, rss in points:
        print(f"{ran:>12,} {rss:>9.1f}")
    growth = points[-1][1] - points[0][1]
    print(f"RSS growth after the first tenth: {growth:+.1f} MiB (limit {args.max_growth_mb})")
    return 0 if growth <= args.max_growth_mb else 1


if __name__ == "__main__":
    sys.exit(run())
