"""The Prometheus side: the endpoint, the app helpers, the exposition format."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import loopscope

from .conftest import sample

Run = Callable[[Callable[[], Awaitable[Any]]], Any]

METRIC_NAMES = {
    "asyncio_loop_callback_duration_seconds",
    "asyncio_loop_schedule_delay_seconds",
    "asyncio_loop_lag_seconds",
    "asyncio_loop_busy_seconds",
    "asyncio_loop_task_steps",
    "asyncio_loop_slow_callbacks",
    "asyncio_loop_blocked_seconds",
    "asyncio_tasks_created",
    "asyncio_tasks",
    "asyncio_loop_info",
    "process_context_switches",
}


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class TestEndpoint:
    """install(port=...) serves /metrics from its own thread."""

    def test_scrape_while_loop_blocked(self, run: Run, registry: CollectorRegistry) -> None:
        """A scrape during a 1 s block is answered before the block ends."""
        installation = loopscope.install(registry=registry, port=0)
        url = f"http://127.0.0.1:{installation.port}/metrics"
        answered: list[tuple[float, int, bytes]] = []
        block_started = threading.Event()

        def scrape() -> None:
            block_started.wait(5)
            time.sleep(0.1)
            status, body = _get(url)
            answered.append((time.monotonic(), status, body))

        async def main() -> float:
            thread = threading.Thread(target=scrape)
            thread.start()
            await asyncio.sleep(0.02)
            block_started.set()
            time.sleep(1.0)
            block_ended = time.monotonic()
            await asyncio.to_thread(thread.join, 5)
            return block_ended

        block_ended = run(main)
        assert len(answered) == 1
        when, status, body = answered[0]
        assert status == 200
        assert when < block_ended
        assert b"asyncio_loop_lag_seconds_bucket" in body

    def test_only_metrics_are_served(self, registry: CollectorRegistry) -> None:
        """Other paths get 404 and other methods 405."""
        installation = loopscope.install(registry=registry, port=0)
        base = f"http://127.0.0.1:{installation.port}"
        assert _get(base + "/metrics")[0] == 200
        assert _get(base + "/etc/passwd")[0] == 404
        request = urllib.request.Request(base + "/metrics", data=b"x", method="POST")
        try:
            urllib.request.urlopen(request, timeout=5)
            status = 200
        except urllib.error.HTTPError as error:
            status = error.code
        assert status == 405

    def test_binds_loopback_by_default(self, registry: CollectorRegistry) -> None:
        """The default address is 127.0.0.1."""
        installation = loopscope.install(registry=registry, port=0)
        assert installation.server is not None
        assert installation.server.httpd.server_address[0] == "127.0.0.1"

    def test_uninstall_frees_port(self, registry: CollectorRegistry) -> None:
        """After uninstall() the port can be bound again."""
        port = loopscope.install(registry=registry, port=0).port
        loopscope.uninstall()
        assert port is not None
        again = loopscope.install(registry=CollectorRegistry(), port=port)
        assert again.port == port


class TestExposition:
    """What a scrape contains."""

    def test_every_documented_family(self, run: Run, registry: CollectorRegistry) -> None:
        """All metric families named in the README are exported."""
        loopscope.install(registry=registry)
        run(lambda: asyncio.sleep(0.02))
        names = {family.name for family in registry.collect()}
        assert names >= METRIC_NAMES

    def test_histogram_buckets_span(self, run: Run, registry: CollectorRegistry) -> None:
        """Buckets run from 10 microseconds to 10 seconds, and count equals +Inf."""
        loopscope.install(registry=registry)
        run(lambda: asyncio.sleep(0.02))
        name = "asyncio_loop_callback_duration_seconds"
        families = [f for f in registry.collect() if f.name == name]
        bounds = [s.labels["le"] for s in families[0].samples if s.name.endswith("_bucket")]
        assert bounds[0] == "1e-05" and "10.0" in bounds and bounds[-1] == "+Inf"
        assert sample(registry, f"{name}_count", loop="MainThread") == sample(
            registry, f"{name}_bucket", loop="MainThread", le="+Inf"
        )

    def test_default_registry(self, run: Run) -> None:
        """Without registry=, the metrics appear in prometheus_client's REGISTRY."""
        from prometheus_client import REGISTRY

        loopscope.install()
        run(lambda: asyncio.sleep(0))
        assert REGISTRY.get_sample_value("asyncio_loop_task_steps_total", {"loop": "MainThread"})
        loopscope.uninstall()
        assert (
            REGISTRY.get_sample_value("asyncio_loop_task_steps_total", {"loop": "MainThread"})
            is None
        )

    def test_promtool_check_metrics(self, run: Run, registry: CollectorRegistry) -> None:
        """promtool check metrics reports nothing on the exposition."""
        promtool = shutil.which("promtool")
        if promtool is None:
            if os.environ.get("CI"):
                pytest.fail("promtool is missing; .ci/run installs Debian's prometheus package")
            pytest.skip("promtool is not installed")
        loopscope.install(registry=registry)
        run(lambda: asyncio.sleep(0.02))
        result = subprocess.run(
            [promtool, "check", "metrics"],
            input=generate_latest(registry),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == b"" and result.stderr.strip() == b""


class TestAppHelpers:
    """/metrics mounted in an existing ASGI or aiohttp app."""

    def test_asgi_app(self, run: Run, registry: CollectorRegistry) -> None:
        """The ASGI app answers with the exposition."""
        loopscope.install(registry=registry)
        app = loopscope.metrics_asgi_app()
        sent: list[dict[str, Any]] = []

        async def main() -> None:
            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "method": "GET",
                "path": "/metrics",
                "query_string": b"",
                "headers": [],
            }
            await app(scope, receive, send)

        run(main)
        assert sent[0]["status"] == 200
        assert b"asyncio_loop_task_steps_total" in b"".join(m.get("body", b"") for m in sent)

    def test_aiohttp_handler(self, run: Run, registry: CollectorRegistry) -> None:
        """The aiohttp handler answers with the exposition over a real socket."""
        from aiohttp import ClientSession, web

        loopscope.install(registry=registry)

        async def main() -> tuple[int, str, str]:
            app = web.Application()
            app.router.add_get("/metrics", loopscope.aiohttp_metrics_handler())
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            try:
                async with (
                    ClientSession() as session,
                    session.get(f"http://127.0.0.1:{port}/metrics") as response,
                ):
                    return response.status, response.headers["Content-Type"], await response.text()
            finally:
                await runner.cleanup()

        status, content_type, text = run(main)
        assert status == 200
        assert content_type.startswith("text/plain")
        assert "asyncio_loop_task_steps_total" in text


class TestEventsRender:
    """Slow-step events render in an app that configured no logging at all."""

    def test_last_resort(
        self, run: Run, registry: CollectorRegistry, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """With neither structlog nor logging configured, a slow step is one warning line
        on standard error (logging's last resort), with the application's frames."""
        import logging

        import structlog

        structlog.reset_defaults()
        root = logging.getLogger()
        saved = root.handlers[:]
        root.handlers.clear()  # as in a program that never configured logging
        try:
            loopscope.install(registry=registry, slow_threshold=0.02)

            async def main() -> None:
                time.sleep(0.03)

            run(main)
        finally:
            root.handlers[:] = saved
        out, err = capfd.readouterr()
        assert out == ""
        first, *stack = err.splitlines()
        assert first.startswith("loop MainThread blocked ") and first.endswith(" in main"), err
        assert stack[0] == "Blocking stack (most recent call last):", err
        assert stack[-1].endswith(", in main"), err
        assert any(line.startswith("  (") and " frames of " in line for line in stack), err


def test_all_is_exported() -> None:
    """__all__ lists exactly the public names, and each exists."""
    public = {
        n
        for n in dir(loopscope)
        if not n.startswith("_") and not isinstance(getattr(loopscope, n), types.ModuleType)
    } - {"annotations"}
    assert set(loopscope.__all__) <= public | {"EventLoopPolicy"}
    for name in loopscope.__all__:
        assert getattr(loopscope, name) is not None
    assert public <= set(loopscope.__all__)
