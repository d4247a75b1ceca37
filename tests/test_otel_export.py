"""OpenTelemetry export end to end: a service exports through the SDK's real OTLP/HTTP
exporter to a receiver started here, which decodes the payloads with opentelemetry-proto.

One receiver serves the module; each service run is told apart by its ``service.name``.
Three runs: set up in code on asyncio's loop and on uvloop, and with zero code under
``opentelemetry-instrument`` (loopscope found through its instrumentor entry point).
"""

from __future__ import annotations

import gzip
import itertools
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from loopscope._otel import INSTRUMENTS, LOOP
from loopscope._stats import BUCKETS

from .conftest import HOT_PATH_VARIABLE

ROOT = Path(__file__).resolve().parent.parent
SERVICE = Path(__file__).resolve().parent / "otel_service.py"
SPECS = {spec.name: spec for spec in INSTRUMENTS}
#: Figures the service's work always produces by its last export (executor figures
#: included); tasks alive and busy workers may have no point then.
BY_LOCATION = "loopscope.eventloop.slow_steps_by_location"
ALWAYS = {
    "loopscope.eventloop.callback.duration",
    "loopscope.eventloop.callback.schedule_delay",
    "loopscope.eventloop.delay",
    "loopscope.eventloop.time",
    "loopscope.eventloop.task.steps",
    "loopscope.eventloop.slow_steps",
    BY_LOCATION,
    "loopscope.eventloop.task.created",
    "loopscope.eventloop.info",
    "process.context_switches",
    "loopscope.executor.queue_delay",
    "loopscope.executor.run.duration",
    "loopscope.executor.workers.max",
}


class Receiver:
    """POST /v1/metrics on 127.0.0.1: every ExportMetricsServiceRequest, by service name."""

    def __init__(self) -> None:
        self.requests: dict[str, list[ExportMetricsServiceRequest]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                status = 404
                if self.path == "/v1/metrics":
                    request = ExportMetricsServiceRequest.FromString(body)
                    receiver.add(request)
                    status = 200
                answer = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: ExportMetricsServiceRequest) -> None:
        for resource_metrics in request.resource_metrics:
            names = [
                a.value.string_value
                for a in resource_metrics.resource.attributes
                if a.key == "service.name"
            ]
            with self.lock:
                self.requests.setdefault(names[0] if names else "", []).append(request)

    def exports(self, service: str) -> list[dict[str, Any]]:
        """Per export of ``service``: loopscope's metrics by name (scope ``loopscope``)."""
        out = []
        with self.lock:
            requests = list(self.requests.get(service, []))
        for request in requests:
            found: dict[str, Any] = {}
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    if scope_metrics.scope.name == "loopscope":
                        for metric in scope_metrics.metrics:
                            found[metric.name] = metric
            if found:
                out.append(found)
        return out


@pytest.fixture(name="receiver", scope="module")
def fixture_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def _environment(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("LOOPSCOPE_") and k != HOT_PATH_VARIABLE) and not k.startswith("OTEL_")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def _points(metric: Any) -> list[Any]:
    return list(getattr(metric, metric.WhichOneof("data")).data_points)


def _attributes(point: Any) -> dict[str, str]:
    return {a.key: a.value.string_value for a in point.attributes}


def _value(point: Any) -> float:
    return float(point.as_int if point.WhichOneof("value") == "as_int" else point.as_double)


def check_exports(exports: list[dict[str, Any]], implementation: str) -> None:
    """Names, units, kinds, attributes, bucket bounds, and counters that only grow."""
    assert len(exports) >= 3, f"only {len(exports)} exports"
    last = exports[-1]
    assert set(last) >= ALWAYS, sorted(ALWAYS - set(last))
    assert set(last) <= set(SPECS)
    kinds = {"histogram": "histogram", "counter": "sum", "updowncounter": "sum", "gauge": "gauge"}
    for name, metric in last.items():
        spec = SPECS[name]
        assert metric.unit == spec.unit, name
        assert metric.WhichOneof("data") == kinds[spec.kind], name
        data = getattr(metric, metric.WhichOneof("data"))
        if spec.kind in ("histogram", "counter", "updowncounter"):
            cumulative = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
            assert data.aggregation_temporality == cumulative, name
        if spec.kind in ("counter", "updowncounter"):
            assert data.is_monotonic == (spec.kind == "counter"), name
        for point in _points(metric):
            assert set(_attributes(point)) == set(spec.attributes), name
            if spec.kind == "histogram":
                assert list(point.explicit_bounds) == list(BUCKETS), name
                assert len(point.bucket_counts) == len(BUCKETS) + 1, name
                assert sum(point.bucket_counts) == point.count, name
    info = _points(last["loopscope.eventloop.info"])
    assert {_attributes(p)["loopscope.loop.implementation"] for p in info} == {implementation}
    # The service's one deliberate block (on a loaded machine, a step can also run slow
    # because the process was not scheduled: counted too, so at least one).
    slow = _points(last["loopscope.eventloop.slow_steps"])
    assert [_attributes(p)[LOOP] for p in slow] == ["MainThread"]
    assert _value(slow[0]) >= 1
    locations = [_attributes(p)["loopscope.location"] for p in _points(last[BY_LOCATION])]
    assert any(location.startswith("otel_service.py:") for location in locations), locations

    # Counters and histograms only grow from one export to the next, and do grow.
    def series(export: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], Any]:
        out = {}
        for name, metric in export.items():
            if SPECS[name].kind in ("counter", "histogram"):
                for point in _points(metric):
                    key = (name, tuple(sorted(_attributes(point).items())))
                    if SPECS[name].kind == "counter":
                        out[key] = (_value(point),)
                    else:
                        out[key] = (point.count, point.sum, *point.bucket_counts)
        return out

    grew = set()
    for before, after in itertools.pairwise(exports):
        old, new = series(before), series(after)
        for key, values in old.items():
            assert key in new, f"{key} went missing"
            assert all(b >= a for a, b in zip(values, new[key], strict=True)), key
            if new[key] != values:
                grew.add(key[0])
    assert {"loopscope.eventloop.task.steps", "loopscope.eventloop.callback.duration"} <= grew


class TestOtlpExport:
    """The SDK's OTLP/HTTP exporter carries every figure, as documented, to a collector."""

    @pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
    def test_set_up_in_code(self, receiver: Receiver, kind: str) -> None:
        """install(otel=True), then the SDK set up as the global provider: every instrument
        arrives with its unit, attributes and Prometheus bucket bounds, and counters only
        grow."""
        _run([sys.executable, str(SERVICE), kind, "code", receiver.endpoint], _environment())
        check_exports(receiver.exports(f"code-{kind}"), kind)

    def test_zero_code_under_opentelemetry_instrument(self, receiver: Receiver) -> None:
        """opentelemetry-instrument finds loopscope's instrumentor entry point: a program
        that never names loopscope or OpenTelemetry exports loopscope's metrics."""
        command = shutil.which("opentelemetry-instrument", path=str(Path(sys.executable).parent))
        assert command is not None, "opentelemetry-instrument is not installed"
        env = _environment(
            OTEL_SERVICE_NAME="zero-code",
            OTEL_METRICS_EXPORTER="otlp_proto_http",
            OTEL_TRACES_EXPORTER="none",
            OTEL_LOGS_EXPORTER="none",
            OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=receiver.endpoint,
            OTEL_METRIC_EXPORT_INTERVAL="100",
            LOOPSCOPE_SLOW_THRESHOLD="0.05",
        )
        _run([command, sys.executable, str(SERVICE), "uvloop", "zero-code"], env)
        check_exports(receiver.exports("zero-code"), "uvloop")
