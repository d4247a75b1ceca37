"""Run loopscope's overhead benchmarks and print one table: ``python -m benchmarks``.

Each comparison is measured side by side in one run: the variants of a workload are run
one after the other in every round (in a rotated order), each in a fresh interpreter, and
the table shows medians over the rounds and the ratio to the uninstrumented loop.  The
targets are checked here and printed as PASS or MISS; nothing here is a test.

Options: ``--quick`` (a smoke run, well under a minute; its figures mean little),
``--only W,...`` (workloads: storm, callbacks, http, peers, accuracy, scrape, memory),
``--rounds N``, ``--python PATH`` (the interpreter for the measured processes; by default
benchmarks/.venv's if it exists, else this one), ``--json FILE`` (all raw results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOADS = (
    "storm",
    "callbacks",
    "http",
    "peers",
    "accuracy",
    "scrape",
    "memory",
    "exemplars",
    "http-traced",
)
PEERS = ("debug", "aiodebug", "aiocop", "pyleak", "monitored-ioloop")
#: Peers that only instrument asyncio's own loop.
ASYNCIO_ONLY = {"debug", "aiodebug"}
# Peers that can take turns in one process with the uninstrumented loop (worker.py,
# measure_paired): pyleak patches nothing global, aiodebug's patch is put in place for its
# turns only.  The others replace the loop (monitored-ioloop), add audit hooks for good
# (aiocop) or are far behind (asyncio's debug mode); they run in fresh processes only.
PAIRED_PEERS = ("pyleak", "aiodebug")
PEER_MODULES = {
    "aiodebug": "aiodebug",
    "aiocop": "aiocop",
    "pyleak": "pyleak",
    "monitored-ioloop": "monitored_ioloop",
}
TARGETS = {"uvloop": 1.10, "asyncio": 1.00}


@dataclass
class Row:
    workload: str
    loop: str
    variant: str
    value: str
    ratio: str = ""
    added: str = ""
    target: str = ""
    result: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.rows.append(Row(*args, **kwargs))


def default_python() -> str:
    venv = HERE / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_worker(
    python: str, spec: dict[str, Any], env_extra: dict[str, str] | None = None, timeout: float = 600
) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("LOOPSCOPE_PURE_PYTHON", None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [python, "-m", "benchmarks.worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"worker {spec.get('variant', spec['kind'])} failed: {tail}")


def peer_available(python: str, peer: str) -> bool:
    module = PEER_MODULES.get(peer)
    if module is None:
        return True
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False)
    return probe.returncode == 0


def rotated(items: list[str], round_no: int) -> list[str]:
    k = round_no % len(items)
    return items[k:] + items[:k]


def side_by_side(
    python: str,
    base_spec: dict[str, Any],
    variants: list[str],
    rounds: int,
    report: Report,
    key: str,
) -> dict[str, list[float]]:
    """Median ns/step per round for every variant, the variants alternated in each round."""
    per_variant: dict[str, list[float]] = {v: [] for v in variants}
    walls: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in rotated(variants, r):
            env = {"LOOPSCOPE_PURE_PYTHON": "1"} if variant == "loopscope-pure" else {}
            spec = dict(base_spec, variant=variant)
            try:
                result = run_worker(python, spec, env)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                report.notes.append(f"{key} {variant}: {exc}")
                continue
            per_variant[variant].append(result["ns_per_step"])
            walls[variant].append(result["wall_ns_per_step"])
            if "path" in result:
                report.raw.setdefault("paths", {})[variant] = result["path"]
    report.raw[key] = per_variant
    report.raw["wall-" + key] = walls
    return per_variant


def ratio_rows(
    report: Report,
    workload: str,
    loop: str,
    per_variant: dict[str, list[float]],
    target: float | None,
    walls: dict[str, list[float]],
) -> dict[str, float]:
    """Rows of one comparison: process CPU ns per step (what the targets are checked on; on
    a shared machine it is far steadier than wall time) and, in brackets, wall-clock ns."""
    base = per_variant.get("base") or []
    if not base:
        report.add(workload, loop, "base", "failed")
        return {}
    base_ns = statistics.median(base)
    base_wall = statistics.median(walls.get("base") or [float("nan")])
    report.add(
        workload, loop, "uninstrumented", f"{base_ns:.0f} ns ({base_wall:.0f} wall)", "1.00x"
    )
    ratios: dict[str, float] = {}
    for variant, values in per_variant.items():
        if variant == "base":
            continue
        if not values:
            report.add(workload, loop, variant, "failed (see notes)")
            continue
        ns = statistics.median(values)
        # the ratio of the medians of the rounds (each round's own ratio varies with noise)
        ratio = ns / base_ns
        wall = statistics.median(walls.get(variant) or [float("nan")])
        ratios[variant] = ratio
        check = ""
        verdict = ""
        if variant == "loopscope" and target is not None:
            check = f"<= {target:.2f}x"
            verdict = "PASS" if ratio <= target else "MISS"
        report.add(
            workload,
            loop,
            variant,
            f"{ns:.0f} ns ({wall:.0f} wall)",
            f"{ratio:.2f}x ({wall / base_wall:.2f}x)",
            f"{ns - base_ns:+.0f} ns",
            check,
            verdict,
        )
    return ratios


# --- workloads ----------------------------------------------------------------------------


def wl_storm(args: argparse.Namespace, report: Report, with_peers: bool) -> None:
    tasks, steps = (100, 300) if args.quick else (100, 2000)
    reps = 2 if args.quick else 5
    for loop in ("uvloop", "asyncio"):
        variants = ["base", "loopscope", "loopscope-pure"]
        if with_peers:
            for peer in PEERS:
                if loop == "uvloop" and peer in ASYNCIO_ONLY:
                    continue
                if peer_available(args.python, peer):
                    variants.append(peer)
                elif loop == "uvloop" or peer in ASYNCIO_ONLY:
                    report.add("1 task-step storm", "-", peer, "not installed", result="n/a")
                    report.notes.append(f"peer {peer}: cannot be imported by {args.python}")
        spec = {
            "kind": "storm",
            "storm": "tasks",
            "loop": loop,
            "width": tasks,
            "length": steps,
            "reps": reps,
            "budget": 1.0 if args.quick else 3.0,
        }
        per = side_by_side(args.python, spec, variants, args.rounds, report, f"storm-{loop}")
        ratios = ratio_rows(
            report,
            f"1 task-step storm {tasks}x{steps}",
            loop,
            per,
            None,  # checked on the paired turns below
            report.raw["wall-storm-" + loop],
        )
        paired = paired_rows(
            args,
            report,
            loop,
            "tasks",
            tasks,
            100 if args.quick else 200,
            "1 task-step storm",
            TARGETS[loop],
            [peer for peer in PAIRED_PEERS if peer in variants],
        )
        if with_peers and "loopscope" in ratios:
            peers_row(report, loop, ratios, paired)


def peers_row(report: Report, loop: str, fresh: dict[str, float], paired: dict[str, float]) -> None:
    """Ahead of every peer: each peer is compared by the way it was measured best, the
    paired turns where it shares a process with the uninstrumented loop, else the fresh
    processes (whose noise is far larger than their differences from loopscope)."""
    compared: dict[str, tuple[float, float, str]] = {}
    for peer in PEERS:
        if peer in paired and "loopscope" in paired:
            compared[peer] = (paired["loopscope"], paired[peer], "paired")
        elif peer in fresh:
            compared[peer] = (fresh["loopscope"], fresh[peer], "fresh")
    if not compared:
        return
    behind = [peer for peer, (ours, theirs, _) in compared.items() if not ours < theirs]
    closest = min(compared, key=lambda peer: compared[peer][1] / compared[peer][0])
    ours, theirs, how = compared[closest]
    report.add(
        "4 peers",
        loop,
        f"loopscope vs closest peer ({closest}, {how})",
        f"{ours:.2f}x vs {theirs:.2f}x",
        ", ".join(f"behind {peer}" for peer in behind),
        target="ahead of all",
        result="MISS" if behind else "PASS",
    )


def paired_rows(
    args: argparse.Namespace,
    report: Report,
    loop: str,
    storm: str,
    width: int,
    steps: int,
    title: str,
    target: float | None,
    peers: list[str] | None = None,
) -> dict[str, float]:
    """A storm on an uninstrumented, a C and a pure-Python loop of one process, in turns
    (benchmarks/worker.py: measure_paired), the ratio taken turn by turn, in one process
    per round; the targets are checked on these.  Fresh processes per variant (the task
    storm's first rows) are needed for the peers, whose patches are global, but the same
    interpreter varies by 30% or more from one process to the next (memory layout), which
    swamps a 20% difference.  The peers that can share the process (PAIRED_PEERS) take
    turns too.  Returns the median ratio of each variant."""
    spec = {
        "kind": "paired",
        "storm": storm,
        "loop": loop,
        "width": width,
        "length": steps,
        "turns": 4 if args.quick else 20,
        "peers": peers or [],
    }
    ratios: dict[str, list[float]] = {}
    ns: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        try:
            res = run_worker(args.python, spec)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            report.notes.append(f"paired storm {loop}: {exc}")
            continue
        if res["path"] != "C":
            report.notes.append(f"paired {storm} {loop}: 'loopscope' ran on the pure path")
        elif res.get("watchdog_wait", {}).get("loopscope") != "C":
            report.notes.append(f"paired {storm} {loop}: the watchdog did not wait in C")
        for variant, values in res["ratios"].items():
            ratios.setdefault(variant, []).extend(values)
        for variant, value in res["ns_per_step"].items():
            ns.setdefault(variant, []).append(value)
    report.raw[f"paired-{loop}"] = {"ratios": ratios, "ns_per_step": ns}
    label = f"{title} {width}x{steps}, {args.rounds}x{spec['turns']} paired turns"
    if not ratios:
        report.add(label, loop, "loopscope", "failed (see notes)")
        return {}
    base_ns = statistics.median(ns["base"])
    report.add(label, loop, "uninstrumented", f"{base_ns:.0f} ns", "1.00x")
    for variant, values in ratios.items():
        median = statistics.median(values)
        q1, _, q3 = statistics.quantiles(values, n=4)
        check = verdict = ""
        if variant == "loopscope" and target is not None:
            check = f"<= {target:.2f}x"
            verdict = "PASS" if median <= target else "MISS"
        report.add(
            label,
            loop,
            variant,
            f"{statistics.median(ns[variant]):.0f} ns",
            f"{median:.2f}x [{q1:.2f}-{q3:.2f}]",
            f"{(median - 1) * base_ns:+.0f} ns",
            check,
            verdict,
        )
    medians = {variant: statistics.median(values) for variant, values in ratios.items()}
    for peer in peers or []:
        if peer in medians and "loopscope" in medians:
            ours, theirs = medians["loopscope"], medians[peer]
            report.add(
                "4 peers, paired turns",
                loop,
                f"loopscope vs {peer}",
                f"{ours:.2f}x vs {theirs:.2f}x",
                target="ahead",
                result="PASS" if ours < theirs else "MISS",
            )
    return medians


def wl_callbacks(args: argparse.Namespace, report: Report) -> None:
    chains, length = (100, 100) if args.quick else (100, 200)
    for storm, label in (("callbacks", "2 call_soon chains"), ("timers", "2 call_later chains")):
        n = length if storm == "callbacks" else max(length // 4, 10)
        for loop in ("uvloop", "asyncio"):
            paired_rows(args, report, loop, storm, chains, n, label, None)


def _pin(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu)]
    return []


def _wrk_command(port: int, seconds: int, connections: int) -> list[str]:
    return [
        *_pin(1),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(HERE / "wrk_count.lua"),
        f"http://127.0.0.1:{port}/",
    ]


def _wrk_result(stdout: str, stderr: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("WRKJSON "):
            result: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            return result
    raise RuntimeError(f"wrk failed: {stdout[-300:]} {stderr[-300:]}")


def _wrk_together(ports: list[int], seconds: int, connections: int) -> list[dict[str, Any]]:
    """One wrk per port, all running at once; their results in the order of ``ports``."""
    procs = [
        subprocess.Popen(
            _wrk_command(port, seconds, connections),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for port in ports
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=180))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [_wrk_result(out, err) for out, err in outputs]


def wl_exemplars(args: argparse.Namespace, report: Report) -> None:
    """What exemplars cost: the task-step storm (steps far under the exemplar floor) and a
    storm of 1.2 ms steps (every one over it), each with and without a span per task, in
    fresh processes side by side; loopscope's ratio to the uninstrumented loop with tracing
    off and on, and with tracing on but no OpenTelemetry for loopscope to find."""
    tasks = 20 if args.quick else 50
    for storm, steps in (
        ("tasks", 300 if args.quick else 2000),
        ("ms-steps", 10 if args.quick else 40),
    ):
        for loop in ("uvloop", "asyncio"):
            spec = {
                "kind": "storm",
                "storm": storm,
                "loop": loop,
                "width": tasks,
                "length": steps,
                "reps": 2 if args.quick else 5,
                "budget": 1.0 if args.quick else 3.0,
            }
            variants = [
                "base",
                "loopscope",
                "base+trace",
                "loopscope+trace",
                "loopscope-no-otel+trace",
            ]
            key = f"exemplars-{storm}-{loop}"
            per = side_by_side(args.python, spec, variants, args.rounds, report, key)
            label = f"7 exemplars: {storm} storm {tasks}x{steps}"
            for variant, base in (
                ("loopscope", "base"),
                ("loopscope+trace", "base+trace"),
                ("loopscope-no-otel+trace", "base+trace"),
            ):
                if not per.get(variant) or not per.get(base):
                    report.add(label, loop, variant, "failed (see notes)")
                    continue
                ns, base_ns = statistics.median(per[variant]), statistics.median(per[base])
                report.add(
                    label,
                    loop,
                    f"{variant} / {base}",
                    f"{ns:.0f} ns/step",
                    f"{ns / base_ns:.3f}x",
                    f"{ns - base_ns:+.0f} ns",
                )


def _http_server(python: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    """A server of benchmarks/http_server.py in alternate mode, on CPU 0, and its port."""
    server = subprocess.Popen(
        [*_pin(0), python, "-m", "benchmarks.http_server", "0", "alternate"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line.startswith("READY "):
        server.kill()
        server.wait()
        raise RuntimeError("server did not start")
    return server, int(line.split()[1])


def _switch(servers: list[subprocess.Popen[str]], variants: list[str]) -> None:
    """Tell each server which variant to serve, and wait until they all do."""
    for server, variant in zip(servers, variants, strict=True):
        assert server.stdin is not None
        server.stdin.write(variant + "\n")
        server.stdin.flush()
    for server, variant in zip(servers, variants, strict=True):
        assert server.stdout is not None
        if not server.stdout.readline().startswith("READY "):
            raise RuntimeError(f"server did not switch to {variant}")


def _stop(server: subprocess.Popen[str]) -> None:
    with contextlib.suppress(OSError):
        server.stdin.close()  # type: ignore[union-attr]
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def wl_http(args: argparse.Namespace, report: Report, traced: bool = False) -> None:
    """Two server processes per round (benchmarks/http_server.py, alternate mode) on the
    same CPU, each under its own wrk at the same time: one serves instrumented and the
    other not, then they swap.  A pair is those two runs; its ratio is the geometric mean
    of the two runs' ratios (loopscope's request rate over the other's), so a difference
    between the two processes cancels, and so does any change in the machine's speed,
    which both servers meet at once.  (One server measured alone before the other, as
    this workload did first, gave pair ratios from 0.73 to 1.59 on this machine: the
    speed of its shared CPUs moves by a third within seconds.)  ``traced``: every
    request in an OpenTelemetry span (both variants)."""
    if shutil.which("wrk") is None:
        report.add("3 HTTP (aiohttp, uvloop)", "uvloop", "-", "wrk not found", result="n/a")
        return
    seconds = 1 if args.quick else 4
    pairs = 1 if args.quick else 3
    connections = 32
    results: dict[str, list[dict[str, Any]]] = {"none": [], "loopscope": []}
    ratios: list[float] = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LOOPSCOPE_PURE_PYTHON", None)
    if traced:
        env["BENCH_TRACE"] = "1"
    for r in range(args.rounds):
        servers: list[subprocess.Popen[str]] = []
        try:
            ports = []
            for _ in range(2):
                server, port = _http_server(args.python, env)
                servers.append(server)
                ports.append(port)
            for pair in range(pairs):
                run_ratios = []
                for first in rotated(["loopscope", "none"], r + pair):
                    variants = [first, "none" if first == "loopscope" else "loopscope"]
                    _switch(servers, variants)
                    _wrk_together(ports, 1, connections)  # warm-up
                    together = _wrk_together(ports, seconds, connections)
                    runs = dict(zip(variants, together, strict=True))
                    for variant, res in runs.items():
                        results[variant].append(res)
                    run_ratios.append(runs["loopscope"]["rps"] / runs["none"]["rps"])
                ratios.append(math.sqrt(run_ratios[0] * run_ratios[1]))
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            report.notes.append(f"http round {r}: {exc}")
        finally:
            for server in servers:
                _stop(server)
    report.raw["http-traced" if traced else "http"] = {**results, "ratios": ratios}
    if not results["none"] or not results["loopscope"]:
        report.add("3 HTTP (aiohttp, uvloop)", "uvloop", "-", "failed (see notes)")
        return
    label = (
        f"3 HTTP aiohttp, 2 servers crossed, wrk {seconds} s, {args.rounds}x{pairs} pairs, "
        f"{connections} conn"
    )
    if traced:
        label += ", a span per request"

    def med(variant: str, key: str) -> float:
        return statistics.median(x[key] for x in results[variant])

    base_rps, ls_rps = med("none", "rps"), med("loopscope", "rps")
    ratio = statistics.median(ratios)
    spread = ""
    if len(ratios) >= 4:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        spread = f" [{q1:.3f}-{q3:.3f}]"
    report.add(label, "uvloop", "uninstrumented req/s", f"{base_rps:.0f} req/s", "1.00x")
    report.add(
        label,
        "uvloop",
        "loopscope req/s (pair ratio)",
        f"{ls_rps:.0f} req/s",
        f"{ratio:.3f}x{spread}",
        f"{(ratio - 1) * 100:+.1f}%",
        ">= 0.98x",
        "PASS" if ratio >= 0.98 else "MISS",
    )
    for pct in ("p50_us", "p99_us"):
        b, s = med("none", pct), med("loopscope", pct)
        spread = max(x[pct] for x in results["none"]) - min(x[pct] for x in results["none"])
        noise = max(spread, 0.05 * b)
        check, verdict = "", ""
        if pct == "p99_us":
            check = f"within noise (+-{noise / 1000:.2f} ms)"
            verdict = "PASS" if s - b <= noise else "MISS"
        report.add(
            label,
            "uvloop",
            f"{pct[:3]} latency",
            f"{b / 1000:.2f} -> {s / 1000:.2f} ms",
            f"{s / b:.2f}x",
            f"{(s - b) / 1000:+.2f} ms",
            check,
            verdict,
        )


def wl_accuracy(args: argparse.Namespace, report: Report) -> None:
    blocks = [5, 20] if args.quick else [5, 20, 100, 500]
    reps = 1 if args.quick else 3
    for loop in ("uvloop", "asyncio"):
        try:
            res = run_worker(
                args.python, {"kind": "accuracy", "loop": loop, "blocks_ms": blocks, "reps": reps}
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            report.notes.append(f"accuracy {loop}: {exc}")
            continue
        report.raw[f"accuracy-{loop}"] = res
        for block in blocks:
            rows = [x for x in res["rows"] if x["block_ms"] == block]
            err_req = statistics.median(x["counter_ms"] - block for x in rows)
            err_act = statistics.median(x["counter_ms"] - x["actual_ms"] for x in rows)
            ev = [x["event_ms"] for x in rows if x["event_ms"] is not None]
            ev_note = f", event {statistics.median(ev):.3f} ms" if ev else ", no event"
            report.add(
                "5 accuracy (blocked_seconds_total)",
                loop,
                f"{block} ms block",
                f"{statistics.median(x['counter_ms'] for x in rows):.3f} ms{ev_note}",
                "",
                f"{err_req:+.3f} ms vs asked, {err_act:+.3f} vs slept",
            )


def wl_scrape(args: argparse.Namespace, report: Report) -> None:
    for loops in (1, 10, 100):
        try:
            res = run_worker(
                args.python,
                {
                    "kind": "scrape",
                    "loop": "asyncio",
                    "loops": loops,
                    "reps": 20 if args.quick else 100,
                },
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            report.notes.append(f"scrape {loops}: {exc}")
            continue
        report.add(
            "6 scrape /metrics",
            "asyncio",
            f"{loops} loop label(s)",
            f"{res['us'] / 1000:.2f} ms",
            "",
            f"{res['bytes']} bytes",
        )


def wl_memory(args: argparse.Namespace, report: Report) -> None:
    batches, per_batch = (4, 50_000) if args.quick else (10, 1_000_000)
    try:
        res = run_worker(
            args.python,
            {"kind": "memory", "loop": "uvloop", "batches": batches, "per_batch": per_batch},
            timeout=1200,
        )
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        report.notes.append(f"memory: {exc}")
        return
    rss = res["rss_kib"]
    growth = rss[-1] - rss[1] if len(rss) > 1 else 0
    report.add(
        "6 memory, uvloop + loopscope",
        "uvloop",
        f"{res['callbacks']:,} callbacks",
        f"RSS {rss[1] / 1024:.1f} -> {rss[-1] / 1024:.1f} MiB",
        "",
        f"{growth:+d} KiB",
        "< 1024 KiB growth",
        "PASS" if growth < 1024 else "MISS",
    )


# --- output -------------------------------------------------------------------------------


def print_table(report: Report, args: argparse.Namespace, elapsed: float) -> None:
    headers = [
        "workload",
        "loop",
        "variant",
        "median (cpu; wall)",
        "vs base (wall)",
        "added",
        "target",
        "result",
    ]
    cells = [
        [r.workload, r.loop, r.variant, r.value, r.ratio, r.added, r.target, r.result]
        for r in report.rows
    ]
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    version = subprocess.run(
        [args.python, "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    paths = report.raw.get("paths", {})
    print(
        f"loopscope benchmarks ({'quick' if args.quick else 'full'} mode, {args.rounds} "
        f"rounds): Python {version}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.platform(terse=True)}; loopscope path: "
        f"{paths.get('loopscope', '?')} (loopscope-pure: {paths.get('loopscope-pure', '?')})"
    )
    print(line(headers))
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for c in cells:
        print(line(c))
    verdicts = [r.result for r in report.rows if r.result in ("PASS", "MISS")]
    print(f"targets: {verdicts.count('PASS')} PASS, {verdicts.count('MISS')} MISS; {elapsed:.0f} s")
    if any(r.workload.startswith("4 peers") for r in report.rows):
        from benchmarks.worker import MEASURES

        print("what each measures:")
        for name, what in MEASURES.items():
            print(f"  {name}: {what}")
    for note in report.notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument(
        "--only", default="", help="comma-separated workloads: " + ",".join(WORKLOADS)
    )
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 5; quick 1)")
    parser.add_argument("--python", default="", help="interpreter of the measured processes")
    parser.add_argument("--json", default="", help="write raw results to this file")
    args = parser.parse_args(argv)
    args.python = args.python or default_python()
    args.rounds = args.rounds or (1 if args.quick else 5)
    chosen = [w for w in args.only.split(",") if w] or list(WORKLOADS)
    unknown = set(chosen) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(sorted(unknown))}")
    report = Report()
    began = time.perf_counter()
    if "storm" in chosen or "peers" in chosen:
        wl_storm(args, report, with_peers="peers" in chosen)
    if "callbacks" in chosen:
        wl_callbacks(args, report)
    if "http" in chosen:
        wl_http(args, report)
    if "http-traced" in chosen:
        wl_http(args, report, traced=True)
    if "exemplars" in chosen:
        wl_exemplars(args, report)
    if "accuracy" in chosen:
        wl_accuracy(args, report)
    if "scrape" in chosen:
        wl_scrape(args, report)
    if "memory" in chosen:
        wl_memory(args, report)
    print_table(report, args, time.perf_counter() - began)
    if args.json:
        Path(args.json).write_text(json.dumps(report.raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
