"""Faults inside loopscope (or in what it calls: registries, collectors, structlog, the port)
never reach the application: each is logged once, that part degrades, the loop goes on."""

from __future__ import annotations

import asyncio
import http.client
import io
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

import loopscope
from loopscope import _installation, _probe

from .conftest import make_loop, sample

Run = Callable[[Callable[[], Awaitable[Any]]], Any]
TIMEOUT = 10.0
LOOP = {"loop": "MainThread"}


class Broken(Exception):
    """A fault planted in loopscope or in something it calls."""


def _scrape(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def _work(steps: int = 50) -> int:
    total = 0
    for i in range(steps):
        await asyncio.sleep(0)
        total += i
    return total


def _loopscope_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "loopscope" and r.levelno >= logging.ERROR]


class RaisingCollector(Collector):
    """Another library's collector that fails at every scrape."""

    def collect(self) -> Iterable[Metric]:
        raise Broken("collector of another library")


class TestRegistryAndCollectorFaults:
    """A failing scrape fails alone."""

    def test_raising_collector_in_registry(
        self, registry: CollectorRegistry, run: Run, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A registry whose collection raises answers 500, logged once; the loop goes on."""
        installation = loopscope.install(registry=registry, port=0)
        bad = RaisingCollector()
        registry.register(bad)
        assert installation.port is not None
        port = installation.port

        async def main() -> tuple[list[int], int]:
            loop = asyncio.get_running_loop()
            statuses = []
            for _ in range(3):
                status, _body = await loop.run_in_executor(None, _scrape, port)
                statuses.append(status)
            return statuses, await _work()

        with caplog.at_level(logging.ERROR, logger="loopscope"):
            statuses, total = run(main)
        assert statuses == [500, 500, 500] and total == sum(range(50))
        assert len(_loopscope_errors(caplog)) == 1
        registry.unregister(bad)
        status, body = _scrape(port)
        assert status == 200 and b"asyncio_loop_task_steps_total" in body

    def test_loopscope_collector_fault(
        self,
        registry: CollectorRegistry,
        run: Run,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """loopscope's own collector failing leaves the rest of the exposition served."""
        installation = loopscope.install(registry=registry, port=0)
        from prometheus_client import Counter

        Counter("app_requests", "The application's own metric.", registry=registry).inc()

        def broken() -> None:
            raise Broken("loopscope collector")

        monkeypatch.setattr(installation.collector, "read", broken)
        assert installation.port is not None
        with caplog.at_level(logging.ERROR, logger="loopscope"):
            assert run(_work) == sum(range(50))
            first = _scrape(installation.port)
            second = _scrape(installation.port)
        for status, body in (first, second):
            assert status == 200 and b"app_requests_total 1.0" in body
            assert b"asyncio_loop_task_steps_total{" not in body
        assert len(_loopscope_errors(caplog)) == 1


class TestStructlogFaults:
    """A broken logging pipeline turns the events off; counting goes on."""

    def test_closed_stream(
        self, registry: CollectorRegistry, run: Run, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A logger writing to a closed stream is reported once; slow steps are still counted."""
        import time

        loopscope.install(registry=registry, slow_threshold=0.02)
        stream = io.StringIO()
        stream.close()
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(stream))
        try:

            async def main() -> str:
                for _ in range(3):
                    time.sleep(0.03)
                    await asyncio.sleep(0)
                return "ok"

            with caplog.at_level(logging.ERROR, logger="loopscope"):
                assert run(main) == "ok"
        finally:
            structlog.reset_defaults()
        assert sample(registry, "asyncio_loop_slow_callbacks_total", **LOOP) >= 3
        assert len(_loopscope_errors(caplog)) == 1


class TestPortTaken:
    """A metrics port already in use is a configuration error, with nothing left behind."""

    def test_nothing_installed_and_loops_run(
        self, registry: CollectorRegistry, busy_port: int, loop_kind: str
    ) -> None:
        """install() names the port; loops made afterwards run unmeasured; a retry works."""
        with pytest.raises(loopscope.ConfigError, match="port"):
            loopscope.install(registry=registry, port=busy_port)
        assert _installation.current() is None
        loop = make_loop(loop_kind)
        try:
            assert loop.run_until_complete(_work()) == sum(range(50))
        finally:
            loop.close()
        assert list(registry.collect()) == []
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port not in (None, busy_port)


class TestHookFaults:
    """Faults in loopscope's per-loop bookkeeping switch that loop's measurement off."""

    def test_heartbeat_fault(
        self,
        registry: CollectorRegistry,
        run: Run,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A heartbeat that cannot re-arm is reported once; the program's results are intact."""
        loopscope.install(registry=registry, lag_interval=0.001)
        armed: set[int] = set()

        def flaky_for(cls: type[Any]) -> Callable[..., Any]:
            original = cls.schedule_raw

            def flaky(self: Any, loop: Any, delay: float, callback: Any) -> Any:
                # The first heartbeat of each loop is armed; re-arming it fails.
                if id(self) in armed:
                    raise Broken("heartbeat")
                armed.add(id(self))
                return original(self, loop, delay, callback)

            return flaky

        for cls in _probe.LoopProbe.__subclasses__():
            monkeypatch.setattr(cls, "schedule_raw", flaky_for(cls))

        async def main() -> int:
            await asyncio.sleep(0.02)
            return await _work()

        with caplog.at_level(logging.ERROR, logger="loopscope"):
            assert run(main) == sum(range(50))
            assert run(main) == sum(range(50))
        assert len(_loopscope_errors(caplog)) == 1

    @pytest.mark.parametrize("where", ["on_run_start", "on_run_stop"])
    def test_run_bookkeeping_fault(
        self,
        registry: CollectorRegistry,
        loop_kind: str,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
        where: str,
    ) -> None:
        """A fault when the loop starts or stops running never reaches run_until_complete."""
        loopscope.install(registry=registry)

        def broken(*_args: Any) -> None:
            raise Broken(where)

        monkeypatch.setattr(_probe.LoopProbe, where, broken)
        loop = make_loop(loop_kind)
        task = loop.create_task(_work())
        try:
            with caplog.at_level(logging.ERROR, logger="loopscope"):
                assert loop.run_until_complete(task) == sum(range(50))
        finally:
            if not task.done():  # while the fault still escapes: leave nothing pending
                task.cancel()
                monkeypatch.undo()
                loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
            loop.close()
        assert len(_loopscope_errors(caplog)) == 1

    def test_close_bookkeeping_fault(
        self,
        registry: CollectorRegistry,
        loop_kind: str,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A fault while folding a closed loop's figures never reaches loop.close()."""
        loopscope.install(registry=registry)

        def broken(*_args: Any) -> None:
            raise Broken("close")

        monkeypatch.setattr(_probe.LoopProbe, "on_close", broken)
        loop = make_loop(loop_kind)
        loop.run_until_complete(_work())
        with caplog.at_level(logging.ERROR, logger="loopscope"):
            loop.close()
        assert loop.is_closed()
        assert len(_loopscope_errors(caplog)) == 1


class TestWatchdogFaults:
    """The watchdog thread dying is logged once; loops go on and slow steps are still counted."""

    def test_watchdog_dies(
        self,
        registry: CollectorRegistry,
        run: Run,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A watchdog round that raises ends the thread with one error; counting goes on."""
        import time

        installation = loopscope.install(registry=registry, slow_threshold=0.02, events="off")
        watchdog = getattr(installation, "watchdog", None)
        if watchdog is None:
            pytest.skip("this build has no watchdog")

        def broken(*_args: Any) -> None:
            raise Broken("watchdog")

        with caplog.at_level(logging.ERROR, logger="loopscope"):
            monkeypatch.setattr(watchdog, "check", broken)
            thread = watchdog.thread
            assert thread is not None
            thread.join(TIMEOUT)
            assert not thread.is_alive() and not watchdog.alive()

            async def main() -> int:
                for _ in range(3):
                    time.sleep(0.03)
                    await asyncio.sleep(0)
                return await _work()

            assert run(main) == sum(range(50))
        assert len(_loopscope_errors(caplog)) == 1
        assert sample(registry, "asyncio_loop_slow_callbacks_total", **LOOP) >= 3
        loopscope.uninstall()  # stopping a dead watchdog is harmless
        assert _installation.current() is None
