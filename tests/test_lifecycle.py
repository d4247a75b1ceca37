"""Life cycles: many loops one after another, loops in threads, a loop closed during a
scrape, uninstall() while loops run.  Nothing per loop outlives its loop."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import tracemalloc
import warnings
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import loopscope
from loopscope import _installation

from .conftest import loop_class, make_loop, patched_names, sample

TIMEOUT = 30.0


def _run_like_an_app(loop_kind: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """asyncio.run() on asyncio's loop; uvloop.run() (or the same by hand) on uvloop."""
    if loop_kind == "asyncio":
        return asyncio.run(main())
    import uvloop

    if hasattr(uvloop, "run"):
        return uvloop.run(main())
    loop = make_loop(loop_kind)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def _installation_now() -> _installation.Installation:
    installation = _installation.current()
    assert installation is not None
    return installation


class TestManyRuns:
    """asyncio.run() 1,000 times leaves no per-loop state and no loop alive."""

    def test_thousand_runs(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """Every loop is collectable, no probe remains, and traced memory stays flat."""
        loopscope.install(registry=registry)
        refs: list[weakref.ref[asyncio.AbstractEventLoop]] = []

        async def main() -> int:
            refs.append(weakref.ref(asyncio.get_running_loop()))
            await asyncio.gather(*(asyncio.sleep(0) for _ in range(3)))
            return 1

        def runs(n: int) -> int:
            return sum(_run_like_an_app(loop_kind, main) for _ in range(n))

        assert runs(100) == 100
        first = sample(registry, "asyncio_tasks_created_total", loop="MainThread")
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            assert runs(900) == 900
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
        alive = [r for r in refs if r() is not None]
        assert alive == [], f"{len(alive)} loops kept alive"
        installation = _installation_now()
        assert installation.live_probes() == []
        series = installation.book.series
        assert list(series) == ["MainThread"] and series["MainThread"].live == {}
        # 900 loops' worth of per-loop state would be far more than this.
        assert growth < 256 * 1024, f"traced memory grew by {growth} bytes over 900 runs"
        # Every run creates the same tasks (main, its three, the runner's own): none lost.
        assert sample(registry, "asyncio_tasks_created_total", loop="MainThread") == 10 * first


class TestUnclosedLoops:
    """A loop dropped without close() lives exactly as long as it does without loopscope;
    when it goes, its probe goes too and its figures stay with its label."""

    @pytest.mark.parametrize("runs", [0, 1], ids=["never_ran", "ran"])
    def test_dropped_without_close(
        self, registry: CollectorRegistry, loop_kind: str, runs: int
    ) -> None:
        def alive_after_dropping() -> int:
            refs: list[weakref.ref[asyncio.AbstractEventLoop]] = []
            for _ in range(3):
                loop = make_loop(loop_kind)
                for _ in range(runs):
                    loop.run_until_complete(asyncio.sleep(0))
                refs.append(weakref.ref(loop))
                del loop
            gc.collect()
            alive = [loop for loop in (r() for r in refs) if loop is not None]
            for loop in alive:  # (uvloop keeps a loop that ran until it is closed)
                loop.close()
            return len(alive)

        # Collected here only: a collection the watchdog's thread set off would run the
        # loops' __del__ there, and a loop in its __del__ is alive for the collection here.
        gc.disable()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)  # "unclosed event loop"
                bare = alive_after_dropping()
                loopscope.install(registry=registry)
                instrumented = alive_after_dropping()
        finally:
            gc.enable()
        assert instrumented == bare
        assert _installation_now().live_probes() == []
        if runs and bare == 0:
            # each loop's run made one task: the figures of the loops collected remain
            assert sample(registry, "asyncio_tasks_created_total", loop="MainThread") == 3

    def test_collected_while_loopscope_holds_its_lock(self, loop_kind: str) -> None:
        """The collector can run inside any allocation, loopscope's own locked sections
        included, and free a loop there: its figures are folded after the section, with no
        deadlock.  (In a child process, which a deadlock would hang.)"""
        # uvloop keeps a loop that ran: that one never runs, and has no figures to keep.
        runs, tasks = (1, 1.0) if loop_kind == "asyncio" else (0, 0.0)
        result = subprocess.run(
            [sys.executable, "-c", _COLLECTED_IN_LOCK, loop_kind, str(runs)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["collected", "probes=0", f"tasks={tasks}"]


_COLLECTED_IN_LOCK = """
import asyncio, gc, sys, warnings, weakref
from prometheus_client import CollectorRegistry
import loopscope
from loopscope import _installation

warnings.simplefilter("ignore", ResourceWarning)  # "unclosed event loop"
kind, runs = sys.argv[1], int(sys.argv[2])
registry = CollectorRegistry()
loopscope.install(registry=registry)
installation = _installation.current()
gc.disable()
if kind == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
else:
    loop = asyncio.new_event_loop()
for _ in range(runs):
    loop.run_until_complete(asyncio.sleep(0))
ref = weakref.ref(loop)
del loop
with installation.book.lock:
    gc.collect()  # frees the loop, whose probe's callback runs here, under the lock
print("collected" if ref() is None else "alive")
print(f"probes={len(installation.live_probes())}")
tasks = registry.get_sample_value("asyncio_tasks_created_total", {"loop": "MainThread"})
print(f"tasks={tasks}")
"""


class TestThreads:
    """Loops in several threads are measured apart and released apart."""

    def test_loops_in_threads(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """Four threads, each its own loop: per-thread labels, exact task counts, no leftovers."""
        loopscope.install(registry=registry)
        refs: list[weakref.ref[asyncio.AbstractEventLoop]] = []
        errors: list[BaseException] = []

        async def main() -> None:
            refs.append(weakref.ref(asyncio.get_running_loop()))
            for _ in range(10):
                await asyncio.create_task(asyncio.sleep(0))

        def body() -> None:
            try:
                for _ in range(5):
                    _run_like_an_app(loop_kind, main)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=body, name=f"loop-thread-{i}") for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive()
        assert errors == []
        gc.collect()
        assert [r for r in refs if r() is not None] == []
        assert _installation_now().live_probes() == []
        created = [
            sample(registry, "asyncio_tasks_created_total", loop=f"loop-thread-{i}")
            for i in range(4)
        ]
        # Five runs of main and its ten tasks (plus the runner's own tasks) in every thread.
        assert len(set(created)) == 1 and created[0] >= 55 and created[0] % 5 == 0


class TestCloseDuringScrape:
    """A loop that closes while a scrape reads it does not disturb either."""

    def test_close_while_scraping(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """200 loops open and close while another thread scrapes without pause."""
        loopscope.install(registry=registry)
        stop = threading.Event()
        errors: list[BaseException] = []
        scrapes = {"n": 0}

        def scrape() -> None:
            while not stop.is_set():
                try:
                    generate_latest(registry)
                    scrapes["n"] += 1
                except BaseException as exc:
                    errors.append(exc)
                    return

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        try:
            for _ in range(200):
                loop = make_loop(loop_kind)
                loop.run_until_complete(asyncio.sleep(0))
                loop.close()
        finally:
            stop.set()
            scraper.join(TIMEOUT)
        assert not scraper.is_alive() and errors == [] and scrapes["n"] > 0
        assert sample(registry, "asyncio_tasks_created_total", loop="MainThread") == 200
        assert _installation_now().live_probes() == []


class TestUninstallWhileRunning:
    """uninstall() from another thread while a loop runs: the loop goes on, unpatched."""

    def test_uninstall_during_run(
        self, registry: CollectorRegistry, loop_kind: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The running loop finishes its work correctly and loses every loopscope patch."""
        loopscope.install(registry=registry)
        loop = make_loop(loop_kind)
        patched = patched_names(loop, loop_kind)
        assert {"run_forever", "close", "create_task"} <= patched
        started = threading.Event()
        release = threading.Event()
        result: list[int] = []

        async def main() -> int:
            total = 0
            started.set()
            while not release.is_set():
                await asyncio.sleep(0.001)
                total += 1
            for i in range(100):
                await asyncio.sleep(0)
                total += i
            return total

        def body() -> None:
            result.append(loop.run_until_complete(main()))

        thread = threading.Thread(target=body, name="running-loop")
        thread.start()
        assert started.wait(TIMEOUT)
        loopscope.uninstall()
        release.set()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert len(result) == 1 and result[0] >= sum(range(100))
        assert not {
            "run_forever",
            "close",
            "create_task",
            "call_at",
            "_call_soon",
            "call_soon",
            "call_later",
            "call_soon_threadsafe",
        } & patched_names(loop, loop_kind)
        assert type(loop) is loop_class(loop_kind)
        if loop_kind == "asyncio":
            selector: Any = getattr(loop, "_selector", None)
            assert type(selector).__module__ == "selectors"
            assert type(selector._selector).__module__ == "select"  # its own poller back
        loop.close()
        assert loop.is_closed()
        assert [r for r in caplog.records if r.name == "loopscope"] == []
        assert _installation.current() is None


class TestUninstallStopsTheWatchdog:
    """uninstall() ends the watchdog thread before it returns, whatever it was doing."""

    def test_watchdog_gone_after_each_uninstall(self, loop_kind: str) -> None:
        """Right after a loop was made, ran and closed (each wakes the watchdog), and with
        a threshold whose wait interval is long, uninstall() still leaves no watchdog."""
        for _ in range(5):
            loopscope.install(registry=CollectorRegistry(), slow_threshold=3000.0, events="off")
            loop = make_loop(loop_kind)
            try:
                loop.run_until_complete(asyncio.sleep(0))
            finally:
                loop.close()
            loopscope.uninstall()
            alive = [t for t in threading.enumerate() if t.name == "loopscope-watchdog"]
            assert alive == []


def _series(registry: CollectorRegistry) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    return [
        (s.name, tuple(sorted(s.labels.items())))
        for family in registry.collect()
        for s in family.samples
    ]


class TestBoundedMemory:
    """Many callbacks leave traced memory flat."""

    def test_callbacks_leave_memory_flat(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """50,000 callbacks after a warm-up grow traced memory by less than 64 KiB."""
        loopscope.install(registry=registry)
        loop = make_loop(loop_kind)

        async def burst(n: int) -> None:
            done = loop.create_future()
            left = {"n": n}

            def tick() -> None:
                left["n"] -= 1
                if left["n"] == 0:
                    done.set_result(None)
                else:
                    loop.call_soon(tick)

            for _ in range(100):  # a hundred chains at once, like a busy server
                loop.call_soon(tick)
            await done

        try:
            loop.run_until_complete(burst(20_000))
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.take_snapshot()
                loop.run_until_complete(burst(50_000))
                gc.collect()
                after = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
        finally:
            loop.close()
        growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
        assert growth < 64 * 1024, f"traced memory grew by {growth} bytes"


class TestBoundedCardinality:
    """Label values that come from the application are capped."""

    def test_loop_labels_capped(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """Loops in 60 differently named threads make at most max_loop_labels + 1 labels."""
        loopscope.install(registry=registry, max_loop_labels=5)

        def body() -> None:
            loop = make_loop(loop_kind)
            try:
                loop.run_until_complete(asyncio.sleep(0))
            finally:
                loop.close()

        for i in range(60):
            thread = threading.Thread(target=body, name=f"request-/users/{i}")
            thread.start()
            thread.join(TIMEOUT)
        loops = {dict(labels).get("loop") for _name, labels in _series(registry)} - {None}
        assert len(loops) <= 6 and "other" in loops

    def test_task_names_are_not_labels(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """Slow tasks named after request paths add no series, however many paths there are."""
        import time

        loopscope.install(registry=registry, slow_threshold=0.02, events="off")

        async def handler() -> None:
            time.sleep(0.025)  # a slow step
            await asyncio.sleep(0)

        async def serve(paths: range) -> None:
            for i in paths:
                await asyncio.create_task(handler(), name=f"GET /users/{i}")

        loop = make_loop(loop_kind)
        try:
            loop.run_until_complete(serve(range(0, 10)))
            first = _series(registry)
            loop.run_until_complete(serve(range(10, 40)))
            second = _series(registry)
        finally:
            loop.close()
        # Locations are code positions (at most max_locations of them), never task names;
        # whether a step got one depends on the watchdog's timing, so they are left out here.
        by_location = "asyncio_loop_slow_callbacks_by_location_total"
        assert len([s for s in second if s[0] != by_location]) == len(
            [s for s in first if s[0] != by_location]
        )
        assert not any("/users/" in value for _n, labels in second for _k, value in labels)

    def test_locations_capped(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """Slow steps at 12 distinct code locations give at most max_locations + 1 values."""
        loopscope.install(registry=registry, slow_threshold=0.03, events="off", max_locations=3)
        handlers = []
        for i in range(12):
            namespace: dict[str, Any] = {}
            source = "import time\nasync def handler():\n    time.sleep(0.045)\n"
            exec(compile(source, f"/srv/app/route_{i}.py", "exec"), namespace)
            handlers.append(namespace["handler"])

        async def serve() -> None:
            for handler in handlers:
                await asyncio.create_task(handler())

        loop = make_loop(loop_kind)
        try:
            loop.run_until_complete(serve())
        finally:
            loop.close()
        locations = {
            dict(labels)["location"]
            for name, labels in _series(registry)
            if name == "asyncio_loop_slow_callbacks_by_location_total"
        }
        assert len(locations) == 4 and "other" in locations, locations
