"""The demo's driver: starts the service in its own process, drives load at it from client
threads, and prints loopscope's figures once a second with the slow-step events."""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Scrape:
    """The figures of one scrape, summed over loops."""

    at: float
    values: dict[str, float] = field(default_factory=dict)
    lag_buckets: dict[float, float] = field(default_factory=dict)


def scrape(url: str) -> Scrape:
    """Read /metrics and keep what the live view shows."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    result = Scrape(at=time.monotonic())
    wanted = {
        "asyncio_loop_busy_seconds_total",
        "asyncio_loop_task_steps_total",
        "asyncio_loop_slow_callbacks_total",
        "asyncio_loop_blocked_seconds_total",
        "asyncio_tasks",
        "asyncio_loop_callback_duration_seconds_count",
    }
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                result.values[s.name] = result.values.get(s.name, 0.0) + s.value
            elif s.name == "asyncio_loop_lag_seconds_bucket":
                le = float(s.labels["le"])
                result.lag_buckets[le] = result.lag_buckets.get(le, 0.0) + s.value
    return result


def quantile_upper_bound(before: Scrape, after: Scrape, q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile of the lag between two scrapes."""
    deltas = sorted(
        (le, after.lag_buckets[le] - before.lag_buckets.get(le, 0.0)) for le in after.lag_buckets
    )
    if not deltas or deltas[-1][1] <= 0:
        return None
    total = deltas[-1][1]
    for le, cumulative in deltas:
        if cumulative >= q * total:
            return le
    return None


class Load:
    """Client threads: steady fast requests, and now and then a request that blocks."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.requests = 0
        self.errors = 0
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._fast, name=f"client-{i}", daemon=True)
            for i in range(clients)
        ]
        self.threads.append(threading.Thread(target=self._bad, name="client-bad", daemon=True))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _request(self, conn: http.client.HTTPConnection, path: str) -> None:
        try:
            conn.request("GET", path)
            conn.getresponse().read()
            with self.lock:
                self.requests += 1
        except (OSError, http.client.HTTPException):
            with self.lock:
                self.errors += 1
            conn.close()

    def _fast(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            self._request(conn, "/")
            time.sleep(0.002)
        conn.close()

    def _bad(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        paths = ["/block?ms=250", "/offload?ms=300", "/cpu?ms=150", "/offload?ms=300"]
        i = 0
        while not self.stop.wait(1.5):
            self._request(conn, paths[i % len(paths)])
            i += 1
        conn.close()


def describe_event(event: dict[str, object]) -> str:
    """One line for a slow_callback or loop_blocked event."""
    what = (
        f"task {event['task']} ({event.get('coro')})" if "task" in event else event.get("callback")
    )
    if event.get("event") == "loop_blocked":
        so_far = float(str(event["blocked_for"])) * 1000
        head = f"loop {event.get('loop')} BLOCKED for {so_far:.0f} ms so far"
    else:
        head = f"slow step: {float(str(event['duration'])) * 1000:.0f} ms"
    location = event.get("location") or "(ended before its stack was taken)"
    return f"  {head} in {what}, blocked at {location}"


def _forward_events(stream: object, ready: list[dict[str, object]], got: threading.Event) -> None:
    for raw in iter(stream.readline, ""):  # type: ignore[attr-defined]
        line = raw.rstrip()
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict) and event.get("event") == "demo_ready":
            ready.append(event)
            got.set()
        elif isinstance(event, dict) and event.get("event") in ("slow_callback", "loop_blocked"):
            print(describe_event(event), flush=True)
        elif line:
            print(f"  service | {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m loopscope.demo``: run the service, load it, and watch."""
    parser = argparse.ArgumentParser(prog="python -m loopscope.demo")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument("--metrics-port", type=int, default=9100)
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds to run; 0 runs until Ctrl-C"
    )
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)

    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loopscope.demo",
            "serve",
            "--port",
            "0",
            "--metrics-port",
            str(args.metrics_port),
            "--loop",
            args.loop,
            "--json-logs",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    ready: list[dict[str, object]] = []
    got_ready = threading.Event()
    threading.Thread(
        target=_forward_events, args=(service.stdout, ready, got_ready), daemon=True
    ).start()
    try:
        if not got_ready.wait(30) or service.poll() is not None:
            print("the demo service did not start; its output is above", file=sys.stderr)
            return 1
        port = int(ready[0]["port"])  # type: ignore[call-overload]
        metrics_url = f"http://127.0.0.1:{ready[0]['metrics_port']}/metrics"
        print(
            f"demo service on http://127.0.0.1:{port}/ ({args.loop} loop); "
            f"loopscope's metrics on {metrics_url}",
            flush=True,
        )
        print("load: 4 clients on /, and every 1.5 s one of /block, /offload, /cpu", flush=True)
        print(
            f"{'time':>5} {'req/s':>7} {'lag p99<=':>10} {'busy':>6} {'steps/s':>8} "
            f"{'tasks':>6} {'slow':>5} {'blocked s':>10}",
            flush=True,
        )
        load = Load(port, args.clients)
        load.start()
        started = time.monotonic()
        previous = scrape(metrics_url)
        previous_requests = 0
        while args.duration <= 0 or time.monotonic() - started < args.duration:
            time.sleep(1.0)
            if service.poll() is not None:
                print("the demo service exited", file=sys.stderr)
                return 1
            current = scrape(metrics_url)
            elapsed = current.at - previous.at
            v, p = current.values, previous.values
            lag = quantile_upper_bound(previous, current, 0.99)
            requests = load.requests

            def rate(
                name: str,
                cur: dict[str, float] = v,
                prev: dict[str, float] = p,
                seconds: float = elapsed,
            ) -> float:
                return (cur[name] - prev[name]) / seconds

            print(
                f"{current.at - started:5.0f} "
                f"{(requests - previous_requests) / elapsed:7.0f} "
                f"{'-' if lag is None else f'{lag * 1000:.2f} ms':>10} "
                f"{rate('asyncio_loop_busy_seconds_total'):6.0%} "
                f"{rate('asyncio_loop_task_steps_total'):8.0f} "
                f"{v['asyncio_tasks']:6.0f} "
                f"{v['asyncio_loop_slow_callbacks_total']:5.0f} "
                f"{v['asyncio_loop_blocked_seconds_total']:10.3f}",
                flush=True,
            )
            previous, previous_requests = current, requests
        load.stop.set()
        print(
            f"done: {load.requests} requests, {load.errors} errors; "
            f"{previous.values['asyncio_loop_slow_callbacks_total']:.0f} slow steps found",
            flush=True,
        )
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        service.terminate()
        try:
            service.wait(10)
        except subprocess.TimeoutExpired:
            service.kill()
