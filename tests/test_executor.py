"""Executor offload: queue wait, run time, busy and maximum workers, per loop and executor."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import multiprocessing
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import loopscope

from .conftest import loop_class, make_loop, patched_names, sample

Run = Callable[[Callable[[], Awaitable[Any]]], Any]
DELAY = "asyncio_executor_queue_delay_seconds"
RUN = "asyncio_executor_run_duration_seconds"
BUSY = "asyncio_executor_workers_busy"
MAX = "asyncio_executor_workers_max"


def labels(executor: str) -> dict[str, str]:
    return {"loop": "MainThread", "executor": executor}


def default_workers() -> int:
    return min(32, (os.cpu_count() or 1) + 4)


def twice(x: int) -> int:
    """Module level, so that a process pool can pickle it."""
    return 2 * x


@pytest.fixture(autouse=True)
def _install(registry: CollectorRegistry) -> None:
    loopscope.install(registry=registry)


class TestDefaultExecutor:
    """asyncio.to_thread and run_in_executor(None, ...) are the ``default`` executor."""

    def test_to_thread_and_none(self, run: Run, registry: CollectorRegistry) -> None:
        """Each call is one queue-delay and one run-duration observation."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            await asyncio.to_thread(time.sleep, 0.03)
            await loop.run_in_executor(None, time.sleep, 0.03)
            assert sample(registry, MAX, **labels("default")) == default_workers()

        run(main)
        assert sample(registry, f"{RUN}_count", **labels("default")) == 2
        assert sample(registry, f"{DELAY}_count", **labels("default")) == 2
        assert sample(registry, f"{RUN}_sum", **labels("default")) >= 0.06
        # The 30 ms calls are not in the buckets below 25 ms.
        assert sample(registry, f"{RUN}_bucket", le="0.025", **labels("default")) == 0

    def test_set_default_executor(self, run: Run, registry: CollectorRegistry) -> None:
        """An executor set with set_default_executor is ``default``, with its own size."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            pool = concurrent.futures.ThreadPoolExecutor(3, thread_name_prefix="mine")
            loop.set_default_executor(pool)
            await asyncio.to_thread(time.sleep, 0)
            await loop.run_in_executor(pool, time.sleep, 0)
            assert sample(registry, MAX, **labels("default")) == 3

        run(main)
        assert sample(registry, f"{RUN}_count", **labels("default")) == 2
        assert registry.get_sample_value(f"{RUN}_count", labels("mine")) is None

    def test_installed_late(self, loop_kind: str, registry: CollectorRegistry) -> None:
        """install() inside a running loop finds the default executor set before it."""
        loopscope.uninstall()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            pool = concurrent.futures.ThreadPoolExecutor(3)
            loop.set_default_executor(pool)
            loopscope.install(registry=registry)
            await asyncio.to_thread(time.sleep, 0)
            assert sample(registry, MAX, **labels("default")) == 3

        loop = make_loop(loop_kind)
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
        assert sample(registry, f"{RUN}_count", **labels("default")) == 1

    def test_results_errors_and_context_unchanged(self, run: Run) -> None:
        """Return values, the very exception object and contextvars pass through."""
        var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
        error = ValueError("boom")

        def fail() -> None:
            raise error

        async def main() -> None:
            var.set("set")
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, twice, 21) == 42
            assert await asyncio.to_thread(var.get) == "set"
            with pytest.raises(ValueError) as caught:
                await asyncio.to_thread(fail)
            assert caught.value is error

        run(main)

    def test_coroutine_still_rejected(self, run: Run) -> None:
        """A coroutine function gets the loop's own TypeError (in debug mode)."""

        async def coro() -> None:
            """Never awaited."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.set_debug(True)  # asyncio's loop checks only in debug mode; uvloop always
            with pytest.raises(TypeError, match="coroutines cannot be used"):
                await loop.run_in_executor(None, coro)

        run(main)


class TestOtherExecutors:
    """Executors passed to run_in_executor, labelled by thread name prefix or class."""

    def test_labels(self, run: Run, registry: CollectorRegistry) -> None:
        """A prefix names the executor; an unnamed pool is its class name, whatever its
        generated thread names."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            named = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="db")
            unnamed = [concurrent.futures.ThreadPoolExecutor(1) for _ in range(3)]
            await loop.run_in_executor(named, time.sleep, 0)
            for pool in unnamed:
                await loop.run_in_executor(pool, time.sleep, 0)
            assert sample(registry, MAX, **labels("db")) == 2
            assert sample(registry, MAX, **labels("ThreadPoolExecutor")) == 3
            named.shutdown()
            for pool in unnamed:
                pool.shutdown()

        run(main)
        assert sample(registry, f"{RUN}_count", **labels("db")) == 1
        assert sample(registry, f"{RUN}_count", **labels("ThreadPoolExecutor")) == 3

    def test_label_cap(self, run: Run, registry: CollectorRegistry) -> None:
        """Past max_executor_labels distinct names, executors count as ``other``."""
        loopscope.uninstall()
        loopscope.install(registry=registry, max_executor_labels=2)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for name in ("a", "b", "c", "d"):
                with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name) as pool:
                    await loop.run_in_executor(pool, time.sleep, 0)

        run(main)
        assert sample(registry, f"{RUN}_count", **labels("a")) == 1
        assert sample(registry, f"{RUN}_count", **labels("b")) == 1
        assert sample(registry, f"{RUN}_count", **labels("other")) == 2

    def test_queue_delay_and_saturation(self, run: Run, registry: CollectorRegistry) -> None:
        """With every worker held, busy equals max and the next call waits in the queue."""
        release = threading.Event()
        started = threading.Semaphore(0)

        def hold() -> None:
            started.release()
            release.wait(10)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="small")
            held = [loop.run_in_executor(pool, hold) for _ in range(2)]
            waiting = loop.run_in_executor(pool, time.sleep, 0)
            for _ in range(2):
                assert await asyncio.to_thread(started.acquire, True, 10)
            assert sample(registry, BUSY, **labels("small")) == 2
            assert sample(registry, MAX, **labels("small")) == 2
            await asyncio.sleep(0.05)
            release.set()
            await asyncio.gather(*held, waiting)
            assert sample(registry, BUSY, **labels("small")) == 0
            pool.shutdown()

        run(main)
        assert sample(registry, f"{DELAY}_count", **labels("small")) == 3
        # The third call waited at least the 50 ms the two workers were held.
        waited = sample(registry, f"{DELAY}_count", **labels("small")) - sample(
            registry, f"{DELAY}_bucket", le="0.025", **labels("small")
        )
        assert waited >= 1
        assert sample(registry, f"{DELAY}_sum", **labels("small")) >= 0.05

    def test_not_a_thread_pool(self, run: Run, registry: CollectorRegistry) -> None:
        """An executor that is not a thread pool gets the caller's function itself, and
        its calls in flight count as busy."""
        seen: list[object] = []
        gate = threading.Event()

        class Inline(concurrent.futures.Executor):
            _max_workers = 4

            def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
                seen.append(fn)
                future: concurrent.futures.Future[Any] = concurrent.futures.Future()

                def later() -> None:
                    gate.wait(10)
                    future.set_result(fn(*args))

                threading.Thread(target=later).start()
                return future

        async def main() -> None:
            loop = asyncio.get_running_loop()
            inline = Inline()
            calls = [loop.run_in_executor(inline, twice, 1) for _ in range(6)]
            assert sample(registry, BUSY, **labels("Inline")) == 4  # capped at the size
            assert sample(registry, MAX, **labels("Inline")) == 4
            gate.set()
            assert await asyncio.gather(*calls) == [2] * 6
            assert sample(registry, BUSY, **labels("Inline")) == 0

        run(main)
        assert seen == [twice] * 6
        assert sample(registry, f"{RUN}_count", **labels("Inline")) == 0

    def test_process_pool(self, run: Run, registry: CollectorRegistry) -> None:
        """A process pool still works (its function is pickled unchanged) and reports its
        size while in use."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            context = multiprocessing.get_context("forkserver")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                assert await loop.run_in_executor(pool, twice, 4) == 8
                assert sample(registry, MAX, **labels("ProcessPoolExecutor")) == 1

        run(main)


class TestLifecycle:
    """Figures outlive the loop; uninstall restores the loop."""

    def test_figures_survive_close(self, loop_kind: str, registry: CollectorRegistry) -> None:
        """Two loops in turn add up; a closed loop's executor has no busy or max left."""
        for _ in range(2):
            loop = make_loop(loop_kind)
            try:
                loop.run_until_complete(asyncio.to_thread(time.sleep, 0))
            finally:
                loop.close()
        assert sample(registry, f"{RUN}_count", **labels("default")) == 2
        assert sample(registry, BUSY, **labels("default")) == 0
        assert sample(registry, MAX, **labels("default")) == 0

    def test_uninstall_restores(self, loop_kind: str) -> None:
        """After uninstall() the loop's own run_in_executor is back."""
        loop = make_loop(loop_kind)
        try:
            assert "run_in_executor" in patched_names(loop, loop_kind)
            loopscope.uninstall()
            assert type(loop) is loop_class(loop_kind)
            assert "run_in_executor" not in vars(loop)
            assert "set_default_executor" not in vars(loop)
            assert loop.run_until_complete(loop.run_in_executor(None, twice, 2)) == 4
        finally:
            loop.close()
