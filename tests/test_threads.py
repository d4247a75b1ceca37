"""Threads: many threads scheduling onto one loop, and scrapes racing the loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import loopscope

from .conftest import make_loop, sample

Run = Callable[[Callable[[], Awaitable[Any]]], Any]
TIMEOUT = 60.0
THREADS = 8
PER_THREAD = 2_000
DELAY_COUNT = "asyncio_loop_schedule_delay_seconds_count"


class Scraper:
    """Scrapes a registry in a loop on its own thread until stopped; keeps any error."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.scrapes = 0
        self.thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                generate_latest(self.registry)
                self.scrapes += 1
            except BaseException as exc:  # the test reports it
                self.errors.append(exc)
                return

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the scraper thread is stuck"


@pytest.fixture(autouse=True)
def _install(registry: CollectorRegistry) -> None:
    loopscope.install(registry=registry)


class TestThreadsafeScheduling:
    """call_soon_threadsafe from many threads at once loses nothing."""

    def test_eight_threads_exact_counts(self, run: Run, registry: CollectorRegistry) -> None:
        """8 threads x 2,000 callbacks: the app sees all, loopscope counts exactly as many."""
        seen = {"n": 0}
        counts: list[float] = []

        async def main() -> None:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            counts.append(sample(registry, DELAY_COUNT, loop="MainThread"))
            total = THREADS * PER_THREAD
            barrier = threading.Barrier(THREADS)

            def callback() -> None:
                seen["n"] += 1
                if seen["n"] == total:
                    done.set_result(None)

            def producer() -> None:
                barrier.wait(TIMEOUT)
                for _ in range(PER_THREAD):
                    loop.call_soon_threadsafe(callback)

            threads = [threading.Thread(target=producer) for _ in range(THREADS)]
            for thread in threads:
                thread.start()
            guard = loop.call_later(TIMEOUT, done.cancel)  # bounds the wait; never runs
            await done
            counts.append(sample(registry, DELAY_COUNT, loop="MainThread"))
            guard.cancel()
            for thread in threads:
                thread.join(TIMEOUT)

        with Scraper(registry) as scraper:
            run(main)
        assert scraper.errors == []
        assert seen["n"] == THREADS * PER_THREAD
        # main's first step, then exactly one observation per scheduled callback.
        assert counts[1] - counts[0] == 1 + THREADS * PER_THREAD

    def test_scrape_and_loop_do_not_deadlock(
        self, loop_kind: str, registry: CollectorRegistry
    ) -> None:
        """Loops created, run and closed in 4 threads while scrapes run: all finish."""
        results: list[int] = []
        lock = threading.Lock()

        def worker() -> None:
            for _ in range(20):
                loop = make_loop(loop_kind)
                try:

                    async def main() -> int:
                        tasks = [asyncio.ensure_future(asyncio.sleep(0)) for _ in range(10)]
                        await asyncio.gather(*tasks)
                        return len(tasks)

                    value = loop.run_until_complete(main())
                finally:
                    loop.close()
                with lock:
                    results.append(value)

        with Scraper(registry) as scraper:
            threads = [threading.Thread(target=worker, name=f"worker-{i}") for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(TIMEOUT)
                assert not thread.is_alive(), "a loop thread is stuck"
        assert scraper.errors == [] and scraper.scrapes > 0
        assert results == [10] * 80
        for i in range(4):
            # main plus its ten tasks, twenty times per thread.
            assert sample(registry, "asyncio_tasks_created_total", loop=f"worker-{i}") == 220


class TestScrapeUnderLoad:
    """Scrapes over HTTP at about 100 a second while the loop is busy: all answered, and
    the loop's own counts stay exact."""

    def test_busy_loop_scraped(self, run: Run, registry: CollectorRegistry) -> None:
        """Every scrape gets a complete exposition; the loop's task count is exact."""
        import http.client
        import time

        from prometheus_client.parser import text_string_to_metric_families

        loopscope.uninstall()
        installation = loopscope.install(registry=registry, port=0, events="off")
        assert installation.port is not None
        port = installation.port
        stop = threading.Event()
        answers: list[tuple[int, bytes]] = []
        errors: list[BaseException] = []

        def scraper() -> None:
            while not stop.is_set():
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
                    conn.request("GET", "/metrics")
                    response = conn.getresponse()
                    answers.append((response.status, response.read()))
                    conn.close()
                except BaseException as exc:
                    errors.append(exc)
                    return
                stop.wait(0.01)

        async def main() -> int:
            async def worker() -> int:
                steps = 0
                for _ in range(100):
                    end = time.perf_counter() + 0.0005
                    while time.perf_counter() < end:
                        pass
                    steps += 1
                    await asyncio.sleep(0)
                return steps

            return sum(await asyncio.gather(*(worker() for _ in range(20))))

        before = sample(registry, "asyncio_tasks_created_total", loop="MainThread")
        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        try:
            assert run(main) == 2000
        finally:
            stop.set()
            thread.join(TIMEOUT)
        assert not thread.is_alive() and errors == [] and answers
        for status, body in answers:
            assert status == 200
            names = {f.name for f in text_string_to_metric_families(body.decode())}
            assert "asyncio_loop_callback_duration_seconds" in names
        # main and its twenty workers.
        assert sample(registry, "asyncio_tasks_created_total", loop="MainThread") - before == 21
