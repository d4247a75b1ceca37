"""The /metrics endpoint's own server: one thread over non-blocking sockets.  Bursts of
scrapers, slow and silent clients, malformed requests and the reuse of a built exposition;
correctness only (no timing is asserted)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

import loopscope
from loopscope import _hotpath, _server


def _engine_types() -> list[Any]:
    """The endpoint engines of both twins (the C one where it is built)."""
    types: list[Any] = [pytest.param(_hotpath.pure.Engine, id="pure")]
    try:
        from loopscope import _speedups
    except ImportError:
        return types
    return [pytest.param(_speedups.Engine, id="c"), *types]


Run = Callable[[Callable[[], Awaitable[Any]]], Any]
TIMEOUT = 10.0


def _get(
    port: int, path: str = "/metrics", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _raw(port: int, *chunks: bytes) -> bytes:
    """Send ``chunks`` one by one on a plain connection; everything the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
        received = b""
        while data := sock.recv(65536):
            received += data
    return received


async def _some_work() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Counting(Collector):
    """Counts the builds of the exposition."""

    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> Iterable[Metric]:
        self.calls += 1
        gauge = GaugeMetricFamily("test_builds", "Builds of the exposition so far.")
        gauge.add_metric([], float(self.calls))
        return [gauge]


class TestServing:
    def test_burst_of_scrapers(self, registry: CollectorRegistry, run: Run) -> None:
        """64 scrapers at once: every one gets a complete exposition."""
        installation = loopscope.install(registry=registry, port=0)
        run(_some_work)
        assert installation.port is not None
        port = installation.port
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda _: _get(port), range(64)))
        for status, headers, body in results:
            assert status == 200
            assert int(headers["Content-Length"]) == len(body)
            names = {f.name for f in text_string_to_metric_families(body.decode())}
            assert "asyncio_loop_task_steps" in names

    def test_answer_while_loop_busy_in_python(self, registry: CollectorRegistry, run: Run) -> None:
        """A loop that holds the GIL in one long step is still scraped from another thread."""
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None
        port = installation.port
        statuses: list[int] = []

        async def main() -> None:
            done = threading.Event()

            def scrape() -> None:
                statuses.append(_get(port)[0])
                done.set()

            threading.Thread(target=scrape, daemon=True).start()
            # Pure-Python work that never yields the loop until the scrape was answered
            # (bounded, so that a broken server fails the test rather than hangs it).
            give_up = time.monotonic() + 2 * TIMEOUT
            while not done.is_set() and time.monotonic() < give_up:
                sum(range(1000))

        run(main)
        assert statuses == [200]

    def test_request_in_pieces(self, registry: CollectorRegistry) -> None:
        """A request that arrives in several segments is answered once it is complete."""
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None
        answer = _raw(installation.port, b"GET /met", b"rics HTTP/1.1\r\nHost: x\r\n", b"\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nConnection: close" in head
        assert b"asyncio_loop_info" in body

    def test_http_1_0_and_query(self, registry: CollectorRegistry) -> None:
        """An HTTP/1.0 request, and a query string after /metrics, are answered; only
        ``name[]`` in the query restricts the families."""
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None
        answer = _raw(installation.port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"asyncio_loop_info" in answer
        some = _raw(
            installation.port,
            b"GET /metrics?name[]=process_context_switches_total HTTP/1.0\r\n\r\n",
        )
        assert some.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"# TYPE process_context_switches_total counter" in some
        assert b"asyncio_loop_info" not in some

    @pytest.mark.parametrize(
        ("request_bytes", "status"),
        [
            (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"400"),
            (b"GET /metrics\r\n\r\n", b"400"),
            (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000, b"431"),
        ],
    )
    def test_malformed_requests(
        self, registry: CollectorRegistry, request_bytes: bytes, status: bytes
    ) -> None:
        """A request that is not HTTP/1.x, or too long, gets an error; the server goes on."""
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None
        answer = _raw(installation.port, request_bytes)
        assert answer.startswith(b"HTTP/1.1 " + status) and b"asyncio_" not in answer
        assert _get(installation.port)[0] == 200

    def test_silent_plain_client_blocks_nobody(self, registry: CollectorRegistry) -> None:
        """A connection that never sends its request does not hold up other scrapers."""
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None
        with socket.create_connection(("127.0.0.1", installation.port), timeout=TIMEOUT) as idle:
            idle.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
            assert _get(installation.port)[0] == 200

    def test_close_with_open_connection(self, registry: CollectorRegistry) -> None:
        """uninstall() stops the server while a client is connected, and closes that
        client's connection."""
        installation = loopscope.install(registry=registry, port=0)
        server = installation.server
        assert server is not None
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as idle:
            idle.sendall(b"GET /metrics HTTP/1.1\r\n")
            # Accepted in order: once a later scrape was answered, the idle one is open.
            assert _get(server.port)[0] == 200
            loopscope.uninstall()
            assert not server.thread.is_alive()
            assert idle.recv(65536) == b""

    def test_duplicate_authorization_refused(self, registry: CollectorRegistry) -> None:
        """Two Authorization headers, even one of them right, get 401."""
        installation = loopscope.install(
            registry=registry, port=0, basic_auth_username="prom", basic_auth_password="pw"
        )
        assert installation.port is not None
        good = "Basic " + base64.b64encode(b"prom:pw").decode()
        answer = _raw(
            installation.port,
            f"GET /metrics HTTP/1.1\r\nAuthorization: {good}\r\n"
            f"Authorization: Basic eDp5\r\n\r\n".encode(),
        )
        assert answer.startswith(b"HTTP/1.1 401") and b"asyncio_" not in answer
        status, _headers, body = _get(installation.port, headers={"Authorization": good})
        assert status == 200 and b"asyncio_" in body


class TestReuse:
    """Scrapes within REUSE_SECONDS of a build get that build; a failed build is not kept."""

    @staticmethod
    def _serve_counting(
        registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, reuse: float
    ) -> tuple[Counting, int]:
        """The endpoint with REUSE_SECONDS = ``reuse`` and a collector counting builds."""
        monkeypatch.setattr(_server, "REUSE_SECONDS", reuse)
        counting = Counting()
        registry.register(counting)
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None
        return counting, installation.port

    def test_reused_within_window(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        counting, port = self._serve_counting(registry, monkeypatch, 3600.0)
        bodies = [_get(port)[2] for _ in range(5)]
        assert counting.calls == 1 and len(set(bodies)) == 1
        head = _raw(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.endswith(b"\r\n\r\n")
        assert f"Content-Length: {len(bodies[0])}\r\n".encode() in head

    def test_rebuilt_after_window(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _counting, port = self._serve_counting(registry, monkeypatch, 0.0)
        for expected in (1.0, 2.0, 3.0):
            body = _get(port)[2].decode()
            assert f"test_builds {expected}" in body


class TestEngine:
    """With the C accelerator, plain HTTP is served by the engine, which answers a request
    head it has seen answered with the exposition from its own copy; these hold on both
    paths, with the difference noted where there is one."""

    def test_engine_serves_plain_http(self, registry: CollectorRegistry) -> None:
        installation = loopscope.install(registry=registry, port=0)
        assert installation.server is not None
        assert isinstance(installation.server.httpd.engine, _hotpath.twin.Engine)

    def test_kept_answer_only_for_the_same_head(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A kept exposition is given to the exact head it answered, never to another
        path, method or set of credentials."""
        monkeypatch.setattr(_server, "REUSE_SECONDS", 3600.0)
        installation = loopscope.install(
            registry=registry, port=0, basic_auth_username="prom", basic_auth_password="pw"
        )
        assert installation.port is not None
        good = {"Authorization": "Basic " + base64.b64encode(b"prom:pw").decode()}
        wrong = {"Authorization": "Basic " + base64.b64encode(b"prom:px").decode()}
        for _ in range(3):
            assert _get(installation.port, headers=good)[0] == 200
            assert _get(installation.port, headers=wrong)[0] == 401
            assert _get(installation.port)[0] == 401
            assert _get(installation.port, "/other", headers=good)[0] == 404
            bare = _raw(installation.port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert bare.startswith(b"HTTP/1.1 401")
            posted = _raw(
                installation.port,
                b"POST /metrics HTTP/1.1\r\nAuthorization: "
                + good["Authorization"].encode()
                + b"\r\n\r\n",
            )
            assert posted.startswith(b"HTTP/1.1 405")

    def test_python_asked_once_per_second_of_date(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The engine (either twin) asks for an answer again only when the answer's Date
        second has passed (or the exposition is due to be built again)."""
        monkeypatch.setattr(_server, "REUSE_SECONDS", 3600.0)
        asked = [0]
        original = _server._Exposition.answer

        def counted(self: _server._Exposition, head_only: bool, form: Any) -> bytes:
            asked[0] += 1
            return original(self, head_only, form)

        monkeypatch.setattr(_server._Exposition, "answer", counted)
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None
        dates = {_get(installation.port)[1]["Date"] for _ in range(20)}
        # One question per second seen; one more where a kept answer ran out a moment
        # before the second changed on the wall clock.
        assert len(dates) <= asked[0] <= len(dates) + 1

    def test_fault_while_answering(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A fault in the code that answers costs that request only (dropped by the
        selector loop, a 500 from the engine); the next one is answered."""
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None
        calls = [0]
        original = _server._parse

        def faulty(head: bytes) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("injected")
            return original(head)

        monkeypatch.setattr(_server, "_parse", faulty)
        first = _raw(installation.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert first == b"" or first.startswith(b"HTTP/1.1 500")
        assert _get(installation.port)[0] == 200


@pytest.mark.parametrize("engine_type", _engine_types())
class TestEngineDirect:
    """The engine on its own (each twin's), with a Python ``respond`` of the test's making."""

    @pytest.fixture(autouse=True)
    def _engine_type(self, engine_type: Any) -> None:
        self.engine_type = engine_type

    def _serve(self, respond: Callable[[bytes | None], Any]) -> tuple[Any, int, Callable[[], None]]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        engine = self.engine_type(listener.fileno(), wake_r.fileno(), respond, 5.0, 4, 64)
        thread = threading.Thread(target=engine.run, daemon=True)
        thread.start()

        def stop() -> None:
            engine.stop()
            wake_w.send(b"x")
            thread.join(TIMEOUT)
            assert not thread.is_alive()
            engine.close_all()
            for sock in (listener, wake_r, wake_w):
                sock.close()

        return engine, listener.getsockname()[1], stop

    def test_respond_faults_and_bad_answers_drop_the_connection(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """What respond() raises, or a wrong answer, goes to sys.unraisablehook and drops
        that connection; the engine goes on."""
        answers: list[Any] = [RuntimeError("injected"), "not a tuple", (b"ok", 0.0)]
        reported: list[type[BaseException] | None] = []
        monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_type))

        def respond(head: bytes | None) -> Any:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        engine, port, stop = self._serve(respond)
        try:
            assert _raw(port, b"A\r\n\r\n") == b""
            assert _raw(port, b"B\r\n\r\n") == b""
            assert _raw(port, b"C\r\n\r\n") == b"ok"
        finally:
            stop()
        assert reported == [RuntimeError, TypeError]
        assert engine.connections == 0

    def test_heads_kept_apart_and_oversized_heads(self) -> None:
        seen: list[bytes | None] = []

        def respond(head: bytes | None) -> tuple[bytes, float]:
            seen.append(head)
            return b"answer to " + (head or b"<too long>"), 3600.0

        _engine, port, stop = self._serve(respond)
        try:
            for _ in range(3):
                assert _raw(port, b"one\r\n\r\n") == b"answer to one"
                assert _raw(port, b"two\r\n", b"\r\n") == b"answer to two"
            assert _raw(port, b"x" * 100) == b"answer to <too long>"
            assert _raw(port, b"x" * 100) == b"answer to <too long>"
        finally:
            stop()
        # Each head asked once, the oversized ones (no head to key on) every time.
        assert seen == [b"one", b"two", None, None]

    def test_connection_limit_and_silent_clients(self) -> None:
        """Past max_connections, new connections are closed at once; the silent ones hold
        their places until they time out or the engine stops, which closes them."""
        engine, port, stop = self._serve(lambda head: (b"ok", 0.0))
        idle = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(4)]
        try:
            deadline = time.monotonic() + TIMEOUT
            while engine.connections < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.connections == 4
            # Closed before its request was read: an end of stream or a reset, no answer.
            try:
                late = _raw(port, b"late\r\n\r\n")
            except ConnectionResetError:
                late = b""
            assert late == b""
        finally:
            stop()
            for sock in idle:
                assert sock.recv(16) == b""
                sock.close()
        assert engine.connections == 0

    def test_bad_arguments(self) -> None:
        with pytest.raises(TypeError, match="respond must be callable"):
            self.engine_type(0, 0, None, 5.0, 4, 64)
        with pytest.raises(ValueError, match="must be positive"):
            self.engine_type(0, 0, print, 5.0, 0, 64)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_uninstall_in_forked_child() -> None:
    """A child made by os.fork() can uninstall (the endpoint's thread stayed in the
    parent) without stopping the parent's endpoint, which still answers."""
    script = textwrap.dedent(
        """
        import http.client, os, sys
        import loopscope
        installation = loopscope.install(port=0)
        pid = os.fork()
        if pid == 0:
            loopscope.uninstall()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(3)
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", installation.port, timeout=10)
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            if response.status != 200 or b"asyncio_loop_info" not in response.read():
                sys.exit(4)
            conn.close()
        loopscope.uninstall()
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
