"""What loopscope measures, on asyncio's loop and on uvloop alike."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import loopscope

from .conftest import make_loop, sample

Run = Callable[[Callable[[], Awaitable[Any]]], Any]
LOOP = {"loop": "MainThread"}


def _bucket(registry: CollectorRegistry, name: str, le: str) -> float:
    return sample(registry, f"{name}_bucket", loop="MainThread", le=le)


@pytest.fixture(autouse=True)
def _install(registry: CollectorRegistry) -> None:
    loopscope.install(registry=registry, slow_threshold=0.05)


class TestCallbackDuration:
    """Every callback scheduled through the loop's API is timed."""

    @pytest.mark.parametrize("how", ["call_soon", "call_later", "call_at", "threadsafe"])
    def test_each_way_of_scheduling(self, run: Run, registry: CollectorRegistry, how: str) -> None:
        """A 20 ms callback lands in the 25 ms bucket and not below 10 ms."""
        name = "asyncio_loop_callback_duration_seconds"

        async def main() -> None:
            loop = asyncio.get_running_loop()
            done = loop.create_future()

            def work() -> None:
                time.sleep(0.02)
                done.set_result(None)

            if how == "call_soon":
                loop.call_soon(work)
            elif how == "call_later":
                loop.call_later(0.001, work)
            elif how == "call_at":
                loop.call_at(loop.time() + 0.001, work)
            else:
                threading.Thread(target=loop.call_soon_threadsafe, args=(work,)).start()
            await done

        run(main)
        # At least the 20 ms callback lies above 10 ms (a preempted step on a loaded machine
        # may join it); the sum includes its 20 ms.
        slow_ones = sample(registry, f"{name}_count", **LOOP) - _bucket(registry, name, "0.01")
        assert slow_ones >= 1
        assert sample(registry, f"{name}_sum", **LOOP) >= 0.02

    def test_count_is_exact(self, run: Run, registry: CollectorRegistry) -> None:
        """N plain callbacks add exactly N observations."""
        name = "asyncio_loop_callback_duration_seconds_count"
        counts: list[float] = []

        async def main() -> None:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            counts.append(sample(registry, name, **LOOP))
            for _ in range(999):
                loop.call_soon(lambda: None)
            loop.call_soon(done.set_result, None)
            await done
            counts.append(sample(registry, name, **LOOP))

        run(main)
        # main's first step (counted after the first read) plus the 1000 callbacks.
        assert counts[1] - counts[0] == 1001


class TestScheduleDelay:
    """How long runnable work waits to start."""

    def test_callback_behind_a_block_waits(self, run: Run, registry: CollectorRegistry) -> None:
        """A callback queued behind a 60 ms block waits at least 50 ms."""
        name = "asyncio_loop_schedule_delay_seconds"

        async def main() -> None:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            loop.call_soon(time.sleep, 0.06)
            loop.call_soon(done.set_result, None)
            await done

        run(main)
        total = sample(registry, f"{name}_count", **LOOP)
        assert total - _bucket(registry, name, "0.05") >= 1
        assert sample(registry, f"{name}_sum", **LOOP) >= 0.05

    def test_idle_loop_has_small_delays(self, run: Run, registry: CollectorRegistry) -> None:
        """Without blocking, no callback waits 50 ms."""
        name = "asyncio_loop_schedule_delay_seconds"

        async def main() -> None:
            for _ in range(20):
                await asyncio.sleep(0.002)

        run(main)
        assert sample(registry, f"{name}_count", **LOOP) == _bucket(registry, name, "0.05")


class TestLag:
    """The heartbeat probe sees blocking, and only while the loop runs."""

    def test_block_shows_as_lag(self, run: Run, registry: CollectorRegistry) -> None:
        """A 150 ms block makes one heartbeat at least 100 ms late."""
        name = "asyncio_loop_lag_seconds"

        async def main() -> None:
            await asyncio.sleep(0.03)
            time.sleep(0.15)
            await asyncio.sleep(0.03)

        run(main)
        assert sample(registry, f"{name}_count", **LOOP) - _bucket(registry, name, "0.1") >= 1

    def test_time_between_runs_is_not_lag(
        self, loop_kind: str, registry: CollectorRegistry
    ) -> None:
        """300 ms spent outside run_until_complete adds no late heartbeat."""
        name = "asyncio_loop_lag_seconds"
        loop = make_loop(loop_kind)
        try:
            loop.run_until_complete(asyncio.sleep(0.05))
            time.sleep(0.3)
            loop.run_until_complete(asyncio.sleep(0.05))
        finally:
            loop.close()
        assert sample(registry, f"{name}_count", **LOOP) >= 4
        assert sample(registry, f"{name}_count", **LOOP) == _bucket(registry, name, "0.25")


class TestBusy:
    """Busy time counts running, not waiting."""

    def test_idle_wait_is_not_busy(self, run: Run, registry: CollectorRegistry) -> None:
        """A loop sleeping 300 ms in asyncio.sleep is busy far less than that."""
        run(lambda: asyncio.sleep(0.3))
        assert sample(registry, "asyncio_loop_busy_seconds_total", **LOOP) < 0.1

    def test_blocking_is_busy(self, run: Run, registry: CollectorRegistry) -> None:
        """A 200 ms block counts as at least 190 ms of busy time."""

        async def main() -> None:
            await asyncio.sleep(0.01)
            time.sleep(0.2)

        run(main)
        assert sample(registry, "asyncio_loop_busy_seconds_total", **LOOP) >= 0.19


class TestTasks:
    """Task steps, tasks created and tasks alive."""

    def test_task_steps_exact(self, run: Run, registry: CollectorRegistry) -> None:
        """10 tasks of 20 sleep(0) make 10 x 21 steps, plus main's first step."""
        counts: list[float] = []

        async def worker() -> None:
            for _ in range(20):
                await asyncio.sleep(0)

        async def main() -> None:
            counts.append(sample(registry, "asyncio_loop_task_steps_total", **LOOP))
            await asyncio.gather(*(worker() for _ in range(10)))
            counts.append(sample(registry, "asyncio_loop_task_steps_total", **LOOP))

        run(main)
        assert counts[1] - counts[0] == 10 * 21 + 1

    def test_tasks_created_and_alive(self, run: Run, registry: CollectorRegistry) -> None:
        """Five pending tasks show in the gauge, and all six in the counter."""
        seen: list[float] = []

        async def main() -> None:
            release = asyncio.Event()
            tasks = [asyncio.create_task(release.wait()) for _ in range(5)]
            await asyncio.sleep(0)
            seen.append(sample(registry, "asyncio_tasks", **LOOP))
            release.set()
            await asyncio.gather(*tasks)

        run(main)
        assert seen == [6.0]  # five waiters and main itself
        assert sample(registry, "asyncio_tasks_created_total", **LOOP) == 6


class TestSlowCallbacks:
    """Steps at or over the threshold are counted and reported."""

    def test_slow_task_step(self, run: Run, registry: CollectorRegistry) -> None:
        """A task step blocking 80 ms is counted with its duration and named in an event."""

        async def handler() -> None:
            time.sleep(0.08)

        async def main() -> None:
            await asyncio.create_task(handler(), name="request-7")

        with capture_logs() as logs:
            run(main)
        assert sample(registry, "asyncio_loop_slow_callbacks_total", **LOOP) == 1
        assert 0.08 <= sample(registry, "asyncio_loop_blocked_seconds_total", **LOOP) < 0.5
        events = [e for e in logs if e["event"] == "slow_callback"]
        assert len(events) == 1
        event = events[0]
        assert event["loop"] == "MainThread"
        assert event["task"] == "request-7"
        assert event["coro"].endswith("handler")
        assert event["threshold"] == 0.05
        assert 0.08 <= event["duration"] < 0.5
        assert "stack" not in event and "exception" not in event

    def test_slow_plain_callback(self, run: Run) -> None:
        """A slow plain callback is described by its name."""

        def heavy_callback() -> None:
            time.sleep(0.06)

        async def main() -> None:
            asyncio.get_running_loop().call_soon(heavy_callback)
            await asyncio.sleep(0.01)

        with capture_logs() as logs:
            run(main)
        events = [e for e in logs if e["event"] == "slow_callback"]
        assert len(events) == 1
        assert "heavy_callback" in events[0]["callback"]
        assert "task" not in events[0]

    def test_fast_steps_are_not_slow(self, run: Run, registry: CollectorRegistry) -> None:
        """Many short steps are not slow steps."""

        async def main() -> None:
            for _ in range(500):
                await asyncio.sleep(0)

        with capture_logs() as logs:
            run(main)
        assert sample(registry, "asyncio_loop_slow_callbacks_total", **LOOP) == 0
        assert not [e for e in logs if e["event"] == "slow_callback"]


class TestLabels:
    """The loop label: thread name by default, or the loop_name option."""

    def test_loop_in_thread_is_named_after_thread(
        self, loop_kind: str, registry: CollectorRegistry
    ) -> None:
        """A loop created in main but run in thread worker-1 is labelled worker-1."""
        loop = make_loop(loop_kind)

        def target() -> None:
            loop.run_until_complete(asyncio.sleep(0.02))

        thread = threading.Thread(target=target, name="worker-1")
        thread.start()
        thread.join(10)
        loop.close()
        assert sample(registry, "asyncio_loop_lag_seconds_count", loop="worker-1") >= 1

    def test_successive_runs_add_up(self, run: Run, registry: CollectorRegistry) -> None:
        """Three loops in one thread add into one series that survives their closing."""
        for _ in range(3):
            run(lambda: asyncio.sleep(0))
        # Each run: the main task's two steps.
        assert sample(registry, "asyncio_loop_task_steps_total", **LOOP) == 6


def test_loop_name_option(loop_kind: str) -> None:
    """install(loop_name=...) sets the label."""
    loopscope.uninstall()
    registry = CollectorRegistry()
    loopscope.install(registry=registry, loop_name="api")
    loop = make_loop(loop_kind)
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    assert sample(registry, "asyncio_loop_task_steps_total", loop="api") == 2
