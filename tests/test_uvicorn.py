"""uvicorn's --loop option with loopscope's loop factories, with a real server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .ports import free_port

ROOT = Path(__file__).resolve().parent.parent
LOOP_FACTORIES = {
    "asyncio": "loopscope:new_event_loop",
    "uvloop": "loopscope:new_uvloop_event_loop",
}


def _get(url: str, deadline: float) -> bytes:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return bytes(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(name="uvicorn_server")
def fixture_uvicorn_server(loop_kind: str) -> Iterator[tuple[int, int]]:
    """uvicorn on loopback with loopscope's factory for the loop under test."""
    http_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, LOOPSCOPE_PORT=str(metrics_port), LOOPSCOPE_SLOW_THRESHOLD="0.1")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "tests.asgi_blocking_app:app",
            "--port", str(http_port), "--loop", LOOP_FACTORIES[loop_kind],
            "--log-level", "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield http_port, metrics_port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def test_uvicorn_loop_factory(uvicorn_server: tuple[int, int], loop_kind: str) -> None:
    """A blocking request under uvicorn shows as a slow step on the right kind of loop."""
    http_port, metrics_port = uvicorn_server
    deadline = time.monotonic() + 30
    assert _get(f"http://127.0.0.1:{http_port}/block", deadline) == b"ok"
    # The step is recorded when it ends, which can be after the client has its answer, and
    # the endpoint may answer from a collection made just before: read until it shows.
    while True:
        text = _get(f"http://127.0.0.1:{metrics_port}/metrics", deadline).decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        slow = [v for (n, _), v in samples.items() if n == "asyncio_loop_slow_callbacks_total"]
        if sum(slow) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert sum(slow) >= 1
    kinds = {
        dict(labels)["implementation"] for (name, labels) in samples if name == "asyncio_loop_info"
    }
    assert kinds == {loop_kind}
