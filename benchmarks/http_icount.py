"""Instructions the HTTP service executes per request, with and without loopscope.

``python -m benchmarks.http_icount [--requests N] [--python PATH]`` (from the checkout root;
also ``--rounds R``, ``--connections C`` (default 32), ``--warmup``, ``--idle``,
``--variants``, ``--keep DIR``, ``--caches``)

Why: workload 3 (``benchmarks/http_server.py``, aiohttp on uvloop) has a target of at most
2% fewer requests per second with loopscope installed, but wall-clock wrk runs on a shared
2-core machine move by up to 40% from run to run, far more than the budget.  (Workload 3
now cancels that by loading an instrumented and an uninstrumented server at once.)  The
number of instructions the server executes per request does not depend on machine load,
so it is counted here with valgrind's callgrind as well.

How: each variant's server runs under callgrind with instrumentation off until it prints
READY (``--instr-atstart=no``, so start-up is fast) and one output file per thread
(``--separate-threads=yes``).  ``callgrind_control -i on`` switches instrumentation on;
this process is the load generator: C threads, each with one HTTP/1.1 keep-alive
``http.client`` connection opened before any measurement, every answer checked (200,
``hello, world``).  After the warm-up requests, each measured interval is bracketed by
``callgrind_control -z`` (zero) and ``-d`` (dump) around exactly N, then 2N requests (the
cost per request must not move between them: linearity), then an idle stretch.  The server
is killed with SIGKILL after the last dump (SIGINT can hang under valgrind).  The count of
a dump is its ``summary`` (callgrind_annotate's PROGRAM TOTALS); thread 1 is the loop thread
(uvloop.run in the main thread), any other is loopscope's watchdog (there is no /metrics
thread: the service installs with the default port=None).  ``it/req`` is loop iterations
(calls of libuv's ``uv__io_poll``) per request: with few connections the batching of
requests per iteration depends on timing and moves the count by up to ~4% (1 connection);
with 32, as wrk in workload 3, the server is saturated and N and 2N agree to ~0.1-0.2%.

``--caches`` also simulates the processor's first-level caches and branch predictors
(callgrind's ``--cache-sim=yes --branch-sim=yes``, about twice as slow) and prints, per
request on the loop thread, the instruction-cache misses (I1mr), data-cache read and write
misses (D1mr, D1mw) and mispredicted conditional and indirect branches (Bcm, Bim).
callgrind takes the caches' sizes from the processor (32 KiB, 8-way, 64-byte lines on the
development machine) but simulates them simply, not as the processor runs them: its
figures say where added time can come from that the instruction count does not show.

Variants: ``none``; ``loopscope`` (defaults, C path when the accelerator loads);
``quiet``, the same with the lag heartbeat every 60 s and the watchdog every 900 s instead
of every 10 and 25 ms; ``pure``, loopscope with LOOPSCOPE_PURE_PYTHON=1.  The heartbeat and
the watchdog cost instructions per second of wall time, not per request; under valgrind a
request takes ~50x longer than natively, so that cost weighs ~50x more per request in the
``loopscope`` row than in production.  ``quiet`` gives the cost the requests themselves
cause; the time-driven part is printed per second (loopscope minus quiet under load, and
idle), to be divided by a native request rate.

All LOOPSCOPE_* variables are removed from the server's environment (the defaults are
measured), PYTHONHASHSEED=0 is set so repeated runs hash alike, and the server runs under
``setarch -R`` (no address randomization) when available.

Reproducibility seen (Python 3.11, 32 connections, N=3000): within one server process the
count per request repeats between N and 2N to ~0.1-0.2%, and rounds of one invocation
agreed to 0.1%; but between invocations the uninstrumented figure moved by up to 0.6%
(157,983 to 158,933 Ir/request) and ``quiet`` by up to 2% (160,198 to 163,410), with and
without ``setarch -R``.  One such difference was traced to CPython's type attribute cache
(``find_name_in_mro`` run on every request in one process, never in the other).  Compare
variants measured in the same invocation, use ``--rounds``, and repeat the invocation.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BODY = b"hello, world\n"
#: Server mode of benchmarks/http_server.py and extra environment, per variant.
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "none": ("none", {}),
    "loopscope": ("loopscope", {}),
    "pure": ("loopscope", {"LOOPSCOPE_PURE_PYTHON": "1"}),
    # A check of the idle subtraction: the C path with (almost) no time-driven work: the lag
    # heartbeat every 60 s and the watchdog waking every 900 s instead of 10 and 25 ms.
    "quiet": ("loopscope", {"LOOPSCOPE_LAG_INTERVAL": "60", "LOOPSCOPE_SLOW_THRESHOLD": "3600"}),
}
DUMP_RE = re.compile(r"\.(\d+)-(\d+)$")
#: libuv's poll, called once per loop iteration: iterations per request show the batching.
POLL_FN = "uv__io_poll"


@dataclass
class Interval:
    """One dump: Ir per callgrind thread over a measured stretch."""

    requests: int  # 0 for the idle stretch
    seconds: float
    threads: dict[int, int]
    iterations: int  # calls of uv__io_poll in the loop thread
    speedups_seen: bool  # code of loopscope's C accelerator ran on the loop thread
    #: every event callgrind counted on the loop thread (Ir only, unless --caches)
    loop_events: dict[str, int] = field(default_factory=dict)

    @property
    def loop(self) -> int:
        return self.threads.get(1, 0)

    @property
    def process(self) -> int:
        return sum(self.threads.values())


@dataclass
class VariantResult:
    variant: str
    c_path: str
    intervals: list[Interval] = field(default_factory=list)

    @property
    def idle(self) -> Interval:
        return next(i for i in self.intervals if i.requests == 0)

    def per_request(self, interval: Interval, *, loop: bool) -> float:
        """Ir per request of the loop thread, or of the whole process."""
        return (interval.loop if loop else interval.process) / interval.requests


def default_python() -> str:
    venv = HERE / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def server_env(python: str, extra: dict[str, str]) -> dict[str, str]:
    """The server's environment: no LOOPSCOPE_* settings, loopscope importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSCOPE_")}
    env["PYTHONHASHSEED"] = "0"
    paths = [str(ROOT)]
    probe = subprocess.run(
        [python, "-c", "import loopscope"], env=env, capture_output=True, cwd=ROOT, check=False
    )
    if probe.returncode != 0:
        paths.append(str(ROOT / "src"))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def describe_path(python: str, env: dict[str, str]) -> str:
    """Which hot path loopscope takes in this environment (a side check, same env)."""
    code = (
        "import sys, loopscope._hotpath as h; s = h.twin; "
        "print(sys.version.split()[0], "
        "'pure Python' if s is h.pure else 'C accelerator ' + str(s.__file__))"
    )
    out = subprocess.run(
        [python, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True
    )
    return out.stdout.strip()


def no_aslr() -> list[str]:
    """``setarch -R``: without address randomization the counts repeat across processes."""
    if shutil.which("setarch") is None:
        return []
    return ["setarch", platform.machine(), "-R"]


def control(pid: int, *args: str) -> None:
    out = subprocess.run(
        ["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0 or "OK" not in out.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {out.stdout}{out.stderr}")


def count_calls(text: str, function: str) -> int:
    """Calls of ``function`` in one callgrind file (names are compressed to ``(id)``)."""
    ident: str | None = None
    total = 0
    current = False
    for line in text.splitlines():
        if line.startswith(("fn=(", "cfn=(")):
            key, _, name = line.partition(")")
            ref = key.split("(")[1]
            if name.strip() == function:
                ident = ref
            current = line.startswith("cfn=") and ref == ident
        elif current and line.startswith("calls="):
            total += int(line[6:].split()[0])
            current = False
    return total


def read_dump(directory: Path, pid: int, number: int) -> Interval:
    """Ir per thread of dump ``number`` (files cg.PID.NUMBER-TT); requests/seconds unset."""
    threads: dict[int, int] = {}
    iterations = 0
    seen = False
    loop_events: dict[str, int] = {}
    for path in directory.glob(f"cg.{pid}.{number}-*"):
        match = DUMP_RE.search(path.name)
        text = path.read_text()
        events = re.search(r"^events: (.+)$", text, re.MULTILINE)
        summary = re.search(r"^summary: (\d+(?: \d+)*)$", text, re.MULTILINE)
        if match is None or summary is None or events is None:
            raise RuntimeError(f"unreadable callgrind dump {path}")
        names, values = events.group(1).split(), [int(v) for v in summary.group(1).split()]
        if len(values) > len(names):
            raise RuntimeError(f"unreadable callgrind dump {path}")
        # callgrind leaves out a line's trailing zeros
        counts = dict(zip(names, values + [0] * (len(names) - len(values)), strict=True))
        thread = int(match.group(2))
        threads[thread] = counts["Ir"]
        if thread == 1:
            loop_events = counts
            iterations = count_calls(text, POLL_FN)
            seen = re.search(r"^c?ob=.*/loopscope/_speedups", text, re.MULTILINE) is not None
    if not threads:
        raise RuntimeError(f"callgrind wrote no dump {number} in {directory}")
    return Interval(0, 0.0, threads, iterations, seen, loop_events)


class LoadGenerator:
    """C keep-alive connections, each in its own thread while a batch runs."""

    def __init__(self, port: int, connections: int) -> None:
        self.conns = [
            http.client.HTTPConnection("127.0.0.1", port, timeout=600) for _ in range(connections)
        ]

    def send(self, requests: int) -> None:
        """Send exactly ``requests`` GET / and check every answer."""
        share, rest = divmod(requests, len(self.conns))
        counts = [share + (i < rest) for i in range(len(self.conns))]
        errors: list[BaseException] = []

        def run(conn: http.client.HTTPConnection, count: int) -> None:
            try:
                for _ in range(count):
                    conn.request("GET", "/")
                    resp = conn.getresponse()
                    body = resp.read()
                    if resp.status != 200 or body != BODY:
                        raise RuntimeError(f"bad answer {resp.status} {body[:80]!r}")
            except BaseException as exc:
                errors.append(exc)

        pairs = zip(self.conns, counts, strict=True)
        threads = [threading.Thread(target=run, args=pair) for pair in pairs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"load generator failed: {errors[0]!r}")

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def wait_ready(proc: subprocess.Popen[str], timeout: float) -> int:
    """The port the server listens on, once it says ``READY <port>``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return int(line.split()[1])
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"server did not print READY (exit code {proc.poll()})")


def measure(python: str, variant: str, args: argparse.Namespace, workdir: Path) -> VariantResult:
    mode, extra = VARIANTS[variant]
    env = server_env(python, extra)
    result = VariantResult(variant, describe_path(python, env) if mode != "none" else "-")
    out = workdir / variant
    out.mkdir(parents=True)
    cmd = [
        *no_aslr(),
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--separate-threads=yes",
        *(["--cache-sim=yes", "--branch-sim=yes"] if args.caches else []),
        f"--callgrind-out-file={out}/cg.%p",
        f"--log-file={out}/valgrind.%p.log",
        python,
        "-m",
        "benchmarks.http_server",
        "0",
        mode,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    load: LoadGenerator | None = None
    try:
        port = wait_ready(proc, timeout=300)
        control(proc.pid, "-i", "on")
        load = LoadGenerator(port, args.connections)
        load.send(args.warmup)
        plan = [args.requests, 2 * args.requests, 0]
        for number, requests in enumerate(plan, start=1):
            control(proc.pid, "-z")
            start = time.monotonic()
            if requests:
                load.send(requests)
            else:
                time.sleep(args.idle)
            seconds = time.monotonic() - start
            control(proc.pid, "-d")
            interval = read_dump(out, proc.pid, number)
            interval.requests, interval.seconds = requests, seconds
            result.intervals.append(interval)
    finally:
        if load is not None:
            load.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    return result


def pct(value: float, base: float) -> str:
    return f"{100 * (value / base - 1):+.2f}%"


def busy(res: VariantResult) -> list[Interval]:
    return [iv for iv in res.intervals if iv.requests]


def print_counts(results: list[VariantResult]) -> None:
    head = (
        f"{'variant':<10} {'requests':>8} {'secs':>6} {'it/req':>7} {'loop Ir':>15} "
        f"{'loop Ir/req':>12} {'process Ir':>15} {'proc Ir/req':>12}"
    )
    print(head)
    print("-" * len(head))
    for res in results:
        for iv in res.intervals:
            if iv.requests:
                print(
                    f"{res.variant:<10} {iv.requests:>8} {iv.seconds:>6.1f} "
                    f"{iv.iterations / iv.requests:>7.3f} {iv.loop:>15,} "
                    f"{res.per_request(iv, loop=True):>12,.0f} {iv.process:>15,} "
                    f"{res.per_request(iv, loop=False):>12,.0f}"
                )
            else:
                print(
                    f"{res.variant:<10} {'idle':>8} {iv.seconds:>6.1f} {iv.iterations:>7} "
                    f"{iv.loop:>15,} {iv.loop / iv.seconds:>10,.0f}/s {iv.process:>15,} "
                    f"{iv.process / iv.seconds:>10,.0f}/s"
                )


def print_linearity(results: list[VariantResult]) -> None:
    print("linearity: Ir/request at N and 2N, and the marginal (I(2N) - I(N)) / N:")
    for res in results:
        small, large = busy(res)
        n = large.requests - small.requests
        cells = []
        for loop in (True, False):
            a, b = res.per_request(small, loop=loop), res.per_request(large, loop=loop)
            marginal = (b * large.requests - a * small.requests) / n
            cells.append(f"{a:,.0f} {b:,.0f} {marginal:,.0f} ({pct(b, a)})")
        print(f"  {res.variant:<10} loop {cells[0]:<36} process {cells[1]}")


def print_added(results: list[VariantResult]) -> None:
    base = next((r for r in results if r.variant == "none"), None)
    if base is None:
        return
    print("added per request vs none, at N and 2N:  loop thread | whole process")
    for res in results:
        if res is base:
            continue
        cells = {
            loop: [
                pct(res.per_request(iv, loop=loop), base.per_request(biv, loop=loop))
                for iv, biv in zip(busy(res), busy(base), strict=True)
            ]
            for loop in (True, False)
        }
        seen = "ran" if any(iv.speedups_seen for iv in busy(res)) else "did not run"
        print(
            f"  {res.variant:<10} {' '.join(cells[True]):<18} | {' '.join(cells[False])}"
            f"   [side check: {res.c_path}; _speedups code {seen} on the loop thread]"
        )


#: The simulated events --caches prints, and what each is.
CACHE_EVENTS = {
    "I1mr": "instruction-cache misses",
    "D1mr": "data-cache read misses",
    "D1mw": "data-cache write misses",
    "Bcm": "mispredicted conditional branches",
    "Bim": "mispredicted indirect branches",
}


def print_caches(results: list[VariantResult]) -> None:
    """Per request on the loop thread: the simulated misses, and what each variant adds."""
    if not all(iv.loop_events.keys() >= CACHE_EVENTS.keys() for r in results for iv in busy(r)):
        return
    base = next((r for r in results if r.variant == "none"), None)
    print("simulated caches and branch predictors, per request on the loop thread (2N):")
    print("  " + "  ".join(f"{name}: {what}" for name, what in CACHE_EVENTS.items()))
    print(f"  {'variant':<10}" + "".join(f"{name:>18}" for name in CACHE_EVENTS))
    for res in results:
        last = busy(res)[-1]
        cells = []
        for name in CACHE_EVENTS:
            value = last.loop_events[name] / last.requests
            cell = f"{value:,.0f}"
            if base is not None and res is not base:
                base_last = busy(base)[-1]
                cell += f" ({pct(value, base_last.loop_events[name] / base_last.requests)})"
            cells.append(f"{cell:>18}")
        print(f"  {res.variant:<10}" + "".join(cells))


def print_time_driven(results: list[VariantResult]) -> None:
    """What the default variant adds over ``quiet`` per second of wall time, under load."""
    by_name = {r.variant: r for r in results}
    if "loopscope" not in by_name or "quiet" not in by_name:
        return
    full, quiet = by_name["loopscope"], by_name["quiet"]
    print("time-driven cost of loopscope (heartbeat, watchdog), Ir per second of wall time:")
    for iv, qiv in zip(busy(full), busy(quiet), strict=True):
        rates = [
            (full.per_request(iv, loop=lp) - quiet.per_request(qiv, loop=lp))
            * iv.requests
            / iv.seconds
            for lp in (True, False)
        ]
        print(
            f"  under load ({iv.requests} requests): loop {rates[0]:>12,.0f}/s   "
            f"process {rates[1]:>12,.0f}/s"
        )
    idle = full.idle
    print(
        f"  idle:                        loop {idle.loop / idle.seconds:>12,.0f}/s   "
        f"process {idle.process / idle.seconds:>12,.0f}/s"
    )
    print("  (natively at R requests/s this adds rate / R Ir per request)")


def print_rounds(rounds: list[list[VariantResult]]) -> None:
    """Across rounds: Ir/request of the 2N interval per round, and the added % of medians.

    The count repeats within a process to ~0.1-0.2% but can move by more from one process
    to the next (see the module docstring), hence several rounds.
    """
    print(f"over {len(rounds)} rounds, Ir/request of the 2N interval (median):")
    medians: dict[tuple[str, bool], float] = {}
    for i, res in enumerate(rounds[0]):
        cells = []
        for loop in (True, False):
            figures = [rnd[i].per_request(busy(rnd[i])[-1], loop=loop) for rnd in rounds]
            medians[res.variant, loop] = statistics.median(figures)
            spread = pct(max(figures), min(figures))
            listed = " ".join(f"{f:,.0f}" for f in figures)
            cells.append(f"{listed} ({medians[res.variant, loop]:,.0f}, spread {spread})")
        print(f"  {res.variant:<10} loop {cells[0]}")
        print(f"  {'':<10} process {cells[1]}")
    if ("none", True) not in medians:
        return
    print("added per request vs none (medians):  loop thread | whole process")
    for res in rounds[0]:
        if res.variant != "none":
            on_loop = pct(medians[res.variant, True], medians["none", True])
            on_all = pct(medians[res.variant, False], medians["none", False])
            print(f"  {res.variant:<10} {on_loop} | {on_all}")


def print_table(results: list[VariantResult]) -> None:
    print_counts(results)
    print()
    print_linearity(results)
    print()
    print_added(results)
    print()
    print_time_driven(results)
    print()
    print_caches(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="N (intervals of N and 2N)")
    parser.add_argument("--python", default=default_python(), help="the server's interpreter")
    parser.add_argument("--connections", type=int, default=32, help="as wrk in workload 3")
    parser.add_argument("--warmup", type=int, default=500, help="requests before measuring")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle interval")
    parser.add_argument(
        "--variants", default="none,loopscope,quiet", help="of none,loopscope,quiet,pure"
    )
    parser.add_argument("--rounds", type=int, default=1, help="fresh server processes per variant")
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind files under DIR")
    parser.add_argument(
        "--caches",
        action="store_true",
        help="also simulate the L1 caches and branch predictors (about twice as slow)",
    )
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    variants = args.variants.split(",")
    if unknown := set(variants) - VARIANTS.keys():
        sys.exit(f"unknown variants: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="http_icount.") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"python {args.python}, {args.connections} connections, warm-up {args.warmup}")
        started = time.monotonic()
        rounds: list[list[VariantResult]] = []
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            done = {v: measure(args.python, v, args, workdir / f"round{r + 1}") for v in order}
            rounds.append([done[v] for v in variants])
            print(f"round {r + 1} of {args.rounds} (order {', '.join(order)}):")
            print_table(rounds[-1])
            print()
        if args.rounds > 1:
            print_rounds(rounds)
        print(f"took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
