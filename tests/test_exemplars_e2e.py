"""End to end: the real Prometheus, with exemplar storage on, scrapes a service that traces
its requests with the OpenTelemetry SDK (one server on asyncio's loop, one on uvloop, in one
process), and its exemplar query API gives back the trace id of a request that blocked each
loop, on the slow-step counter and on the callback-duration bucket."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .test_prometheus_e2e import (
    binary,
    http_get,
    start_prometheus,
    stop_process,
    tail,
    wait_until,
)

SERVICE = Path(__file__).resolve().parent / "traced_service.py"
LOOP_LABELS = ("asyncio-loop", "uvloop-loop")
#: From the blocking requests to their exemplars in Prometheus (a 1 s scrape interval).
EXEMPLARS_DEADLINE_S = 60.0


def _exemplars(prometheus_url: str, query: str, since: float) -> dict[str, set[str]]:
    """Per ``loop`` label, the trace ids of the exemplars Prometheus holds for ``query``."""
    params = urllib.parse.urlencode({"query": query, "start": since, "end": time.time() + 60})
    body = json.loads(http_get(f"{prometheus_url}/api/v1/query_exemplars?{params}", 10))
    assert body["status"] == "success", body
    found: dict[str, set[str]] = {}
    for series in body["data"]:
        label = series["seriesLabels"].get("loop", "")
        for exemplar in series["exemplars"]:
            found.setdefault(label, set()).add(exemplar["labels"].get("trace_id", ""))
    return found


@pytest.fixture(name="scraped_service", scope="module")
def fixture_scraped_service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, dict[str, int], Any]]:
    """The traced service and Prometheus scraping it every second: Prometheus's URL, the
    service's port per loop label, and the service process."""
    prometheus = binary("prometheus")
    workdir = tmp_path_factory.mktemp("exemplars-e2e")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        service_log = workdir / "service.log"
        with service_log.open("wb") as err:
            service = subprocess.Popen(
                [sys.executable, str(SERVICE)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=workdir,
            )
        processes.append(service)
        assert service.stdout is not None
        line = service.stdout.readline().decode().split()
        if not line or line[0] != "ready":
            pytest.fail(f"the traced service did not start:\n{tail(service_log, 40)}")
        asyncio_port, uvloop_port, metrics_port = (int(p) for p in line[1:])
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    "job_name": "traced",
                    "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                }
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        server, url = start_prometheus(
            prometheus, config_path, workdir, "--enable-feature=exemplar-storage"
        )
        processes.append(server)
        yield url, dict(zip(LOOP_LABELS, (asyncio_port, uvloop_port), strict=True)), service
    finally:
        for process in processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in reversed(processes):
            stop_process(process)
            if process.stdout is not None:
                process.stdout.close()


def test_prometheus_keeps_the_blocked_requests_trace(
    scraped_service: tuple[str, dict[str, int], Any],
) -> None:
    """A request that blocked each loop (four times the slow threshold) is the exemplar of
    that loop's slow-step counter and of a callback-duration bucket, as Prometheus stores
    them."""
    url, ports, _service = scraped_service
    since = time.time() - 60
    traces = {
        label: http_get(f"http://127.0.0.1:{port}/block?ms=200", timeout=10).decode()
        for label, port in ports.items()
    }
    expected = {label: {trace} for label, trace in traces.items()}

    def holds(found: dict[str, set[str]]) -> bool:
        return all(expected[label] <= found.get(label, set()) for label in LOOP_LABELS)

    deadline = time.monotonic() + EXEMPLARS_DEADLINE_S
    slow = wait_until(
        lambda: _exemplars(url, "asyncio_loop_slow_callbacks_total", since), holds, deadline
    )
    assert holds(slow), (traces, slow)
    buckets = wait_until(
        lambda: _exemplars(url, "asyncio_loop_callback_duration_seconds_bucket", since),
        holds,
        deadline,
    )
    assert holds(buckets), (traces, buckets)
