"""Every way out of /metrics negotiates as prometheus_client's own server does: the same
requests (Accept, Accept-Encoding, ``?name[]=``) sent to loopscope's endpoint, its ASGI app
and its aiohttp handler, and to ``prometheus_client.start_http_server`` serving the same
registry, get the same status, content type, encoding and body (values aside, which move
between two scrapes)."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import loopscope

Run = Callable[[Callable[[], Awaitable[Any]]], Any]
TIMEOUT = 10.0

#: (path, headers): what Prometheus 2 and 3, curl and browsers send, and the odd cases.
REQUESTS: list[tuple[str, dict[str, str]]] = [
    ("/metrics", {}),
    ("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}),
    (
        "/metrics",
        {
            "Accept": "application/openmetrics-text;version=1.0.0,"
            "application/openmetrics-text;version=0.0.1;q=0.75,"
            "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            "Accept-Encoding": "gzip",
        },
    ),
    (
        "/metrics",
        {
            "Accept": "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
            "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.5,*/*;q=0.1",
            "Accept-Encoding": "gzip",
        },
    ),
    ("/metrics", {"Accept": "application/openmetrics-text"}),
    ("/metrics", {"Accept": "text/plain; version=1.0.0; escaping=underscores"}),
    ("/metrics", {"Accept": "text/html", "Accept-Encoding": "deflate, GZIP;q=1.0, *;q=0.5"}),
    ("/metrics", {"Accept-Encoding": "identity"}),
    (
        "/metrics?name[]=asyncio_loop_task_steps_total&name[]=process_context_switches_total",
        {"Accept": "application/openmetrics-text; version=1.0.0"},
    ),
    ("/metrics?name[]=test_requests_total&other=1", {"Accept-Encoding": "gzip"}),
]

#: A sample line's name and labels; what follows (value, timestamp, exemplar) moves.
_SAMPLE = re.compile(r'^[^{ ]+(?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?')


def _shape(body: bytes) -> list[str]:
    """The body's lines with each sample's value left out."""
    lines = []
    for line in body.decode().splitlines():
        if line.startswith("#"):
            lines.append(line)
        else:
            match = _SAMPLE.match(line)
            assert match is not None, line
            lines.append(match.group(0))
    return lines


Answer = tuple[int, str, str | None, list[str]]


def _answer(status: int, content_type: str, encoding: str | None, body: bytes) -> Answer:
    decoded = gzip.decompress(body) if encoding == "gzip" else body
    return status, content_type, encoding, _shape(decoded)


def _fetch(port: int, path: str, headers: dict[str, str]) -> Answer:
    """GET with exactly ``headers`` (http.client would add its own Accept-Encoding)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return _answer(
            response.status,
            response.getheader("Content-Type") or "",
            response.getheader("Content-Encoding"),
            response.read(),
        )
    finally:
        conn.close()


class BuildThreads(Collector):
    """Notes the thread of each collection."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def collect(self) -> Iterable[Metric]:
        self.threads.append(threading.current_thread())
        return [GaugeMetricFamily("test_builds_seen", "Collections so far.", len(self.threads))]


@pytest.fixture(name="servers")
def fixture_reference(registry: CollectorRegistry, run: Run) -> Iterator[tuple[int, int]]:
    """loopscope installed on ``registry`` with a loop's figures in it, a prometheus_client
    counter beside them (OpenMetrics gives it a ``_created`` sample), and prometheus_client's
    own server on the same registry: its port, and loopscope's endpoint's."""
    Counter("test_requests", "Requests.", registry=registry).inc()
    installation = loopscope.install(registry=registry, port=0)
    assert installation.port is not None

    async def some_steps() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    run(some_steps)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    yield server.server_port, installation.port
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT)


class TestSideBySide:
    """The same requests get the same answers from loopscope as from prometheus_client."""

    def test_endpoint(self, servers: tuple[int, int]) -> None:
        """loopscope's endpoint (the hot path's engine) answers as prometheus_client does."""
        reference, port = servers
        for path, headers in REQUESTS:
            ours = _fetch(port, path, headers)
            assert ours == _fetch(reference, path, headers), (path, headers)

    def test_asgi_app(self, servers: tuple[int, int], loop_kind: str) -> None:
        """The ASGI app answers as prometheus_client does."""
        reference = servers[0]
        from .conftest import make_loop

        app = loopscope.metrics_asgi_app()

        async def ask(path: str, headers: dict[str, str]) -> Answer:
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            target, _, query = path.partition("?")
            scope = {
                "type": "http",
                "method": "GET",
                "path": target,
                "query_string": query.encode(),
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            }
            await app(scope, receive, send)
            start = dict(sent[0]["headers"])
            encoding = start.get(b"content-encoding")
            return _answer(
                sent[0]["status"],
                start[b"content-type"].decode(),
                encoding.decode() if encoding is not None else None,
                sent[1]["body"],
            )

        loop = make_loop(loop_kind)
        try:
            for path, headers in REQUESTS:
                ours = loop.run_until_complete(ask(path, headers))
                assert ours == _fetch(reference, path, headers), (path, headers)
        finally:
            loop.close()

    def test_aiohttp_handler(self, servers: tuple[int, int], loop_kind: str) -> None:
        """The aiohttp handler answers as prometheus_client does, over a real socket."""
        reference = servers[0]
        from aiohttp import web

        from .conftest import make_loop

        async def serve_all() -> list[tuple[Answer, Answer]]:
            app = web.Application()
            app.router.add_get("/metrics", loopscope.aiohttp_metrics_handler())
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            try:
                pairs = []
                for path, headers in REQUESTS:
                    ours = await asyncio.to_thread(_fetch, port, path, headers)
                    pairs.append((ours, _fetch(reference, path, headers)))
                return pairs
            finally:
                await runner.cleanup()

        loop = make_loop(loop_kind)
        try:
            pairs = loop.run_until_complete(serve_all())
        finally:
            loop.close()
        for (ours, theirs), request in zip(pairs, REQUESTS, strict=True):
            assert ours == theirs, request


class TestOffLoop:
    """The app helpers build the exposition on loopscope's thread, not the loop's."""

    def test_asgi_and_aiohttp_build_elsewhere(self, registry: CollectorRegistry, run: Run) -> None:
        """Every collection a helper triggers runs outside the loop's thread, on the
        ``loopscope-exposition`` thread; an unreadable Accept is a 400, not a fault."""
        from aiohttp.test_utils import make_mocked_request

        seen = BuildThreads()
        registry.register(seen)
        loopscope.install(registry=registry)
        app = loopscope.metrics_asgi_app()
        handler = loopscope.aiohttp_metrics_handler()
        loop_threads: list[threading.Thread] = []

        async def main() -> list[int]:
            loop_threads.append(threading.current_thread())
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": []}
            await app(scope, receive, send)
            bad = [(b"accept", b"text/plain; version=x")]
            await app({**scope, "headers": bad}, receive, send)
            response = await handler(make_mocked_request("GET", "/metrics"))
            return [sent[0]["status"], sent[2]["status"], response.status]

        assert run(main) == [200, 400, 200]
        assert len(seen.threads) == 2  # one per helper: each keeps its own exposition
        for thread in seen.threads:
            assert thread is not loop_threads[0]
            assert thread.name.startswith("loopscope-exposition")
