"""Scraping /metrics 100 times a second while the loop is busy: no deadlock, and the loop's
own figures stay within noise of the same run without scrapes.

    python benchmarks/scrape_load.py                 # asyncio's loop, 5 s per phase
    python benchmarks/scrape_load.py --loop uvloop --seconds 10 --rate 200

Each phase runs the same busy workload (tasks that compute for about 200 µs per step and
callbacks that chain) for --seconds; the second phase adds a thread that GETs /metrics over
HTTP at --rate per second.  It prints, per phase: steps done, scrapes answered, the loop's
callback-duration quantiles and lag quantiles read from loopscope's own histograms, and the
relative difference.  Exits 1 if a scrape failed or a phase did not finish in time.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

import loopscope
from loopscope._stats import BUCKETS


@dataclass
class Phase:
    name: str
    steps: int = 0
    scrapes: int = 0
    scrape_errors: int = 0
    scrape_p99_ms: float = 0.0
    callback_p50: float = 0.0
    callback_p99: float = 0.0
    lag_p50: float = 0.0
    lag_p99: float = 0.0


def make_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def quantile(counts: list[int], q: float) -> float:
    """Upper bound of the bucket holding quantile q (seconds)."""
    total = sum(counts)
    if total == 0:
        return 0.0
    running = 0
    for bound, count in zip([*BUCKETS, float("inf")], counts, strict=True):
        running += count
        if running >= q * total:
            return bound
    return float("inf")


def histogram_counts(installation: loopscope.Installation, attr: str) -> list[int]:
    book = installation.book
    with book.lock:
        series = list(book.series.values())
    counts = [0] * (len(BUCKETS) + 1)
    for s in series:
        for stats in [s.retired, *list(s.live.values())]:
            for i, n in enumerate(getattr(stats, attr).counts):
                counts[i] += n
    return counts


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def workload(seconds: float, counter: list[int]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def worker() -> None:
        while loop.time() < deadline:
            spin(0.0002)
            counter[0] += 1
            await asyncio.sleep(0)

    def chain() -> None:
        counter[0] += 1
        if loop.time() < deadline:
            loop.call_soon(chain)

    for _ in range(20):
        loop.call_soon(chain)
    await asyncio.gather(*(worker() for _ in range(20)))


SCRAPER = r"""
import http.client, sys, time
from concurrent.futures import ThreadPoolExecutor
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])

def scrape():
    t = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status == 200, time.perf_counter() - t
    except OSError:
        return False, time.perf_counter() - t

# Scrapes start on schedule whether or not the previous one has finished, as several
# Prometheus servers would; at most 32 are in flight.
futures = []
with ThreadPoolExecutor(32) as pool:
    began = next_at = time.perf_counter()
    while time.perf_counter() - began < seconds:
        futures.append(pool.submit(scrape))
        next_at += 1.0 / rate
        time.sleep(max(0.0, next_at - time.perf_counter()))
results = [f.result() for f in futures]
ok = sum(1 for good, _ in results if good)
durations = sorted(d for _, d in results)
print(ok, len(results) - ok, durations[int(0.99 * (len(durations) - 1))] if durations else 0.0)
"""


def start_scraper(port: int, rate: float, seconds: float) -> subprocess.Popen[str]:
    """A separate process scrapes, as Prometheus would: it does not share the GIL."""
    return subprocess.Popen(
        [sys.executable, "-c", SCRAPER, str(port), str(rate), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )


def run_phase(
    name: str,
    kind: str,
    seconds: float,
    installation: loopscope.Installation,
    rate: float | None,
) -> Phase:
    phase = Phase(name)
    before_cb = histogram_counts(installation, "callback_duration")
    before_lag = histogram_counts(installation, "lag")
    scraper = None
    if rate is not None:
        assert installation.port is not None
        scraper = start_scraper(installation.port, rate, seconds)
    counter = [0]
    loop = make_loop(kind)
    try:
        loop.run_until_complete(asyncio.wait_for(workload(seconds, counter), seconds * 3 + 10))
    finally:
        loop.close()
        if scraper is not None:
            try:
                out, _ = scraper.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                scraper.kill()
                raise SystemExit("the scraper is stuck: the endpoint stopped answering") from None
            ok, errors, p99 = out.split()
            phase.scrapes, phase.scrape_errors = int(ok), int(errors)
            phase.scrape_p99_ms = float(p99) * 1000
    phase.steps = counter[0]
    cb = [
        a - b
        for a, b in zip(histogram_counts(installation, "callback_duration"), before_cb, strict=True)
    ]
    lag = [a - b for a, b in zip(histogram_counts(installation, "lag"), before_lag, strict=True)]
    phase.callback_p50, phase.callback_p99 = quantile(cb, 0.5), quantile(cb, 0.99)
    phase.lag_p50, phase.lag_p99 = quantile(lag, 0.5), quantile(lag, 0.99)
    return phase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=100.0, help="scrapes per second")
    args = parser.parse_args(argv)

    installation = loopscope.install(registry=CollectorRegistry(), port=0, slow_events=False)
    quiet = run_phase("no scrapes", args.loop, args.seconds, installation, None)
    loaded = run_phase(f"{args.rate:g} scrapes/s", args.loop, args.seconds, installation, args.rate)
    loopscope.uninstall()

    print(f"{args.loop} loop, {args.seconds:g} s per phase, Python {sys.version.split()[0]}")
    print(
        f"{'phase':>16} {'steps':>9} {'scrapes':>8} {'errors':>6} {'scrape p99':>10} "
        f"{'cb p50':>8} {'cb p99':>8} {'lag p50':>8} {'lag p99':>8}"
    )
    for p in (quiet, loaded):
        print(
            f"{p.name:>16} {p.steps:>9} {p.scrapes:>8} {p.scrape_errors:>6} "
            f"{p.scrape_p99_ms:>8.1f}ms {p.callback_p50 * 1e6:>6.0f}µs "
            f"{p.callback_p99 * 1e6:>6.0f}µs {p.lag_p50 * 1e3:>6.1f}ms "
            f"{p.lag_p99 * 1e3:>6.1f}ms"
        )
    change = (loaded.steps - quiet.steps) / max(quiet.steps, 1)
    print(
        f"throughput change under scraping: {change:+.1%} (quantiles are bucket bounds: "
        "a change of one bucket is the resolution, not a regression)"
    )
    expected = args.rate * args.seconds
    print(
        f"scrapes answered: {loaded.scrapes} of {expected:.0f} asked "
        f"({loaded.scrapes / args.seconds:.0f}/s)"
    )
    if loaded.scrape_errors or loaded.scrapes == 0:
        print(f"FAIL: {loaded.scrape_errors} scrapes failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
