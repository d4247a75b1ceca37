"""The demo's driver: starts the service in its own process, drives load at it from client
threads, and watches it with ``loopscope top`` (its terminal view on a terminal, plain lines
otherwise).  However the driver is stopped (its duration over, ``q``, Ctrl-C, SIGTERM or
SIGHUP), it stops the service; and the service stops by itself when the driver is gone
(its standard input, a pipe from the driver, reaches its end)."""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from .._top import run_top
from .._top_figures import Endpoint


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

    def finish(self, within: float) -> None:
        """Stop, and let the requests in flight end (for at most ``within`` seconds)."""
        self.stop.set()
        deadline = time.monotonic() + within
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

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


class _Stopped(Exception):
    """SIGTERM or SIGHUP arrived: stop as Ctrl-C would."""


def _raise_stopped(signum: int, _frame: object) -> None:
    raise _Stopped(signal.Signals(signum).name)


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """In the block, SIGTERM and SIGHUP raise :class:`_Stopped` in the main thread."""
    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _forward_output(stream: IO[str], ready: list[dict[str, object]], got: threading.Event) -> None:
    """Read the service's output: its ready line, and anything but its event lines (which
    top shows) on stderr."""
    for raw in iter(stream.readline, ""):
        line = raw.rstrip()
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict) and event.get("event") == "demo_ready":
            ready.append(event)
            got.set()
        elif isinstance(event, dict) and event.get("event") in ("slow_callback", "loop_blocked"):
            continue
        elif line:
            print(f"  service | {line}", file=sys.stderr, flush=True)


def _stop_service(service: subprocess.Popen[str]) -> None:
    if service.poll() is None:
        service.terminate()
    try:
        service.wait(10)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait()


def main(argv: list[str] | None = None) -> int:
    """``python -m loopscope.demo``: run the service, load it, and watch it with top."""
    parser = argparse.ArgumentParser(prog="python -m loopscope.demo")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument("--metrics-port", type=int, default=9100)
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds to run; 0 runs until q or Ctrl-C"
    )
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)

    with _stopped_by_signals():
        service = subprocess.Popen(
            [sys.executable, "-m", "loopscope.demo", "serve", "--port", "0",
             "--metrics-port", str(args.metrics_port), "--loop", args.loop, "--json-logs",
             "--stop-at-stdin-end"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            # Its own session: a Ctrl-C on the terminal reaches the driver only, which stops
            # the load before the service, so that no request is cut short.
            start_new_session=True,
        )  # fmt: skip
        load: Load | None = None
        try:
            assert service.stdout is not None
            ready: list[dict[str, object]] = []
            got_ready = threading.Event()
            threading.Thread(
                target=_forward_output, args=(service.stdout, ready, got_ready), daemon=True
            ).start()
            if not got_ready.wait(30) or service.poll() is not None:
                print("the demo service did not start; its output is above", file=sys.stderr)
                return 1
            port = int(str(ready[0]["port"]))
            metrics_url = f"http://127.0.0.1:{ready[0]['metrics_port']}/metrics"
            print(
                f"demo service (pid {service.pid}) on http://127.0.0.1:{port}/ ({args.loop} "
                f"loop); loopscope's metrics on {metrics_url}",
                flush=True,
            )
            print(f"load: {args.clients} clients on /, and every 1.5 s one of /block, "
                  "/offload, /cpu", flush=True)  # fmt: skip
            load = Load(port, args.clients)
            load.start()
            return run_top([Endpoint(metrics_url)], interval=1.0, duration=args.duration)
        except (KeyboardInterrupt, _Stopped):
            return 0
        finally:
            # A second signal must not cut the clean-up short.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            if load is not None:
                load.finish(within=5.0)
            _stop_service(service)
            if load is not None:
                print(f"done: {load.requests} requests, {load.errors} errors", flush=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)
