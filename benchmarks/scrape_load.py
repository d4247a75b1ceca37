"""Scraping /metrics 100 times a second while the loop is busy: no deadlock, and the loop's
own figures compared with the same run without scrapes, against the run's own noise.

    python benchmarks/scrape_load.py                        # asyncio's loop
    python benchmarks/scrape_load.py --loop uvloop --rounds 5 --seconds 4 --rate 200

Every phase runs the same busy workload (20 tasks that compute for about 200 µs per step
and 20 callback chains) on an instrumented loop for --seconds.  Three kinds of phase:

* ``quiet``: nothing else runs;
* ``control``: the scraper runs at --rate against a trivial HTTP server in *another*
  process that answers with a body of the exposition's size, so the phase carries the
  load generator's own cost (its CPU, the kernel's TCP work) but not loopscope's;
* ``scraped``: the same scraper against loopscope's endpoint in the loop's process.

``scraped`` minus ``control`` is what serving /metrics in-process costs the loop; ``control``
minus ``quiet`` is what the load generator costs the machine.  With two CPUs or more the
loop's process (its endpoint thread included, so everything the endpoint costs lands on the
loop's CPU) is pinned to one CPU and the scraper and the control server to another
(``--no-pin`` turns that off).  The phases run in rounds, their order rotated every round,
and the spread of the quiet phases over the rounds is the run's noise: a difference is
called "within noise" only when it is no larger than that spread.

Per phase it prints: steps done, the loop thread's share of a CPU, the CPU the process's
other threads used per scrape (the endpoint's cost, as seen by the OS), scrapes answered and
failed, scrape latency, and the callback-duration and lag quantiles read from loopscope's own
histograms (bucket upper bounds: 1-2.5-5 steps, so one bucket is the resolution), plus the
share of callbacks over 500 µs.  Exits 1 if a scrape failed or a phase did not finish.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest

import loopscope
from loopscope._stats import BUCKETS

KINDS = ("quiet", "control", "scraped")
#: Callbacks over this many seconds count as stretched (the workload's steps take ~210 µs).
STRETCHED = 0.0005


@dataclass
class Phase:
    kind: str
    round: int
    seconds: float = 0.0
    steps: int = 0
    loop_cpu: float = 0.0  # CPU seconds of the loop thread
    other_cpu: float = 0.0  # CPU seconds of the process's other threads
    scrapes: int = 0
    scrape_errors: int = 0
    scrape_p50_ms: float = 0.0
    scrape_p99_ms: float = 0.0
    callback_p50: float = 0.0
    callback_p99: float = 0.0
    stretched: float = 0.0  # share of callbacks over STRETCHED
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


def share_over(counts: list[int], seconds: float) -> float:
    """Share of observations in buckets whose lower bound is at least ``seconds``."""
    total = sum(counts)
    if total == 0:
        return 0.0
    lower = [0.0, *BUCKETS]
    return sum(c for low, c in zip(lower, counts, strict=True) if low >= seconds) / total


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


def _pin_prologue(cpus: str) -> str:
    """Code that pins the process running it to ``cpus`` ("1" or "1,2,3"; "": no pinning)."""
    if not cpus:
        return ""
    return f"import os\nos.sched_setaffinity(0, {{{cpus}}})\n"


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

print("ready", flush=True)
sys.stdin.readline()
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
pick = lambda q: durations[int(q * (len(durations) - 1))] if durations else 0.0
print(ok, len(results) - ok, pick(0.5), pick(0.99), flush=True)
"""

# The control: one thread, one connection at a time, a fixed answer of the exposition's size.
CONTROL_SERVER = r"""
import socket, sys
size = int(sys.argv[1])
body = b"# " + b"x" * max(0, size - 3) + b"\n"
head = ("HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n\r\n").encode()
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(128)
print(listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    try:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        conn.sendall(head + body)
    except OSError:
        pass
    finally:
        conn.close()
"""


class Scraper:
    """A separate process scrapes, as Prometheus would: it does not share the GIL."""

    def __init__(self, port: int, rate: float, seconds: float, cpus: str) -> None:
        self.seconds = seconds
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _pin_prologue(cpus) + SCRAPER,
                str(port),
                str(rate),
                str(seconds),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("the scraper did not start")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> tuple[int, int, float, float]:
        try:
            out, _ = self.proc.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise SystemExit("the scraper is stuck: the endpoint stopped answering") from None
        ok, errors, p50, p99 = out.split()
        return int(ok), int(errors), float(p50), float(p99)


def run_phase(
    kind: str,
    round_: int,
    loop_kind: str,
    seconds: float,
    installation: loopscope.Installation,
    target_port: int | None,
    rate: float,
    scraper_cpus: str,
) -> Phase:
    phase = Phase(kind, round_)
    scraper = None
    if target_port is not None:
        scraper = Scraper(target_port, rate, seconds, scraper_cpus)
    counter = [0]
    loop = make_loop(loop_kind)
    before_cb = histogram_counts(installation, "callback_duration")
    before_lag = histogram_counts(installation, "lag")
    try:
        if scraper is not None:
            scraper.go()
        wall, thread_cpu, process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
        loop.run_until_complete(asyncio.wait_for(workload(seconds, counter), seconds * 3 + 10))
        phase.seconds = time.perf_counter() - wall
        phase.loop_cpu = time.thread_time() - thread_cpu
        phase.other_cpu = time.process_time() - process_cpu - phase.loop_cpu
    finally:
        loop.close()
        if scraper is not None:
            ok, errors, p50, p99 = scraper.result()
            phase.scrapes, phase.scrape_errors = ok, errors
            phase.scrape_p50_ms, phase.scrape_p99_ms = p50 * 1000, p99 * 1000
    phase.steps = counter[0]
    cb = [
        a - b
        for a, b in zip(histogram_counts(installation, "callback_duration"), before_cb, strict=True)
    ]
    lag = [a - b for a, b in zip(histogram_counts(installation, "lag"), before_lag, strict=True)]
    phase.callback_p50, phase.callback_p99 = quantile(cb, 0.5), quantile(cb, 0.99)
    phase.stretched = share_over(cb, STRETCHED)
    phase.lag_p50, phase.lag_p99 = quantile(lag, 0.5), quantile(lag, 0.99)
    return phase


def choose_cpus(pin: bool) -> tuple[set[int] | None, str]:
    """CPUs for the loop's process, and (as text) for the scraper and control server."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None, ""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, ""
    return {cpus[0]}, ",".join(str(c) for c in cpus[1:])


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}µs"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:g}ms"


def spread(values: list[float]) -> float:
    """(max - min) / median: the relative range of a set of phases."""
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three phases")
    parser.add_argument("--rate", type=float, default=100.0, help="scrapes per second")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="do not pin processes to CPUs"
    )
    args = parser.parse_args(argv)

    loop_cpus, other_cpus = choose_cpus(args.pin)
    if loop_cpus is not None:
        # Before any thread starts, so the endpoint's and the watchdog's threads inherit it.
        os.sched_setaffinity(0, loop_cpus)
    installation = loopscope.install(registry=CollectorRegistry(), port=0, events="off")
    assert installation.port is not None
    # Warm up once (imports, first loop), then size the control's answer like the exposition.
    warm = make_loop(args.loop)
    warm.run_until_complete(workload(0.3, [0]))
    warm.close()
    size = len(generate_latest(installation.options.registry))
    control = subprocess.Popen(
        [sys.executable, "-c", _pin_prologue(other_cpus) + CONTROL_SERVER, str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert control.stdout is not None
    control_port = int(control.stdout.readline())
    ports: dict[str, int | None] = {
        "quiet": None,
        "control": control_port,
        "scraped": installation.port,
    }
    phases: list[Phase] = []
    try:
        for r in range(args.rounds):
            order = KINDS[r % 3 :] + KINDS[: r % 3]
            for kind in order:
                phases.append(
                    run_phase(
                        kind,
                        r + 1,
                        args.loop,
                        args.seconds,
                        installation,
                        ports[kind],
                        args.rate,
                        other_cpus,
                    )
                )
    finally:
        control.kill()
        control.wait()
        loopscope.uninstall()

    pinning = (
        f"loop process on CPU {sorted(loop_cpus)[0]}, scraper and control on CPU {other_cpus}"
        if loop_cpus is not None
        else "not pinned"
    )
    print(
        f"{args.loop} loop, Python {sys.version.split()[0]}, {args.rounds} rounds x "
        f"{args.seconds:g} s per phase, {args.rate:g} scrapes/s, {pinning}, "
        f"exposition {size} bytes"
    )
    print(
        f"{'round':>5} {'phase':>8} {'steps/s':>8} {'loop CPU':>8} {'other CPU':>12} "
        f"{'scrapes':>7} {'err':>3} {'scrape p50/p99':>16} {'cb p50':>6} {'cb p99':>7} "
        f"{'cb>500µs':>8} {'lag p50':>7} {'lag p99':>7}"
    )
    for p in phases:
        per_scrape = f"{p.other_cpu / p.scrapes * 1e6:.0f}µs/scrape" if p.scrapes else "-"
        scrape = f"{p.scrape_p50_ms:.1f}/{p.scrape_p99_ms:.1f}ms" if p.scrapes else "-"
        print(
            f"{p.round:>5} {p.kind:>8} {p.steps / p.seconds:>8.0f} "
            f"{p.loop_cpu / p.seconds:>8.0%} {per_scrape:>12} {p.scrapes:>7} "
            f"{p.scrape_errors:>3} {scrape:>16} {fmt_us(p.callback_p50):>6} "
            f"{fmt_us(p.callback_p99):>7} {p.stretched:>8.2%} {fmt_ms(p.lag_p50):>7} "
            f"{fmt_ms(p.lag_p99):>7}"
        )

    by_kind = {k: [p for p in phases if p.kind == k] for k in KINDS}
    rate_of = {k: [p.steps / p.seconds for p in ps] for k, ps in by_kind.items()}
    med = {k: statistics.median(v) for k, v in rate_of.items()}
    noise = spread(rate_of["quiet"])
    print(
        "steps/s, median over rounds: "
        + ", ".join(f"{k} {med[k]:.0f} (spread {spread(rate_of[k]):.1%})" for k in KINDS)
    )
    print(f"noise (spread of the quiet rounds' steps/s, (max-min)/median): {noise:.1%}")
    for label, a, b in (
        ("control vs quiet (the load generator)", "control", "quiet"),
        ("scraped vs control (serving in-process)", "scraped", "control"),
        ("scraped vs quiet (everything)", "scraped", "quiet"),
    ):
        change = med[a] / med[b] - 1
        verdict = "within noise" if abs(change) <= noise else "beyond noise"
        print(f"  {label}: {change:+.1%}, {verdict}")
    for name, attr, fmt in (
        ("cb p50", "callback_p50", fmt_us),
        ("cb p99", "callback_p99", fmt_us),
        ("lag p50", "lag_p50", fmt_ms),
        ("lag p99", "lag_p99", fmt_ms),
    ):
        print(
            f"  {name} by round: "
            + "; ".join(
                f"{k} " + " ".join(fmt(getattr(p, attr)) for p in by_kind[k]) for k in KINDS
            )
        )
    print(
        "  callbacks over 500 µs, by round: "
        + "; ".join(f"{k} " + " ".join(f"{p.stretched:.2%}" for p in by_kind[k]) for k in KINDS)
    )
    failed = sum(p.scrape_errors for p in by_kind["scraped"])
    answered = sum(p.scrapes for p in by_kind["scraped"])
    asked = args.rate * args.seconds * args.rounds
    print(f"scrapes answered by loopscope: {answered} of about {asked:.0f} asked, {failed} failed")
    if failed or answered == 0:
        print(f"FAIL: {failed} scrapes of the endpoint failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
