"""The optional C accelerator (loopscope._speedups) against the pure-Python path.

Both paths run in this one process: ``_hotpath.twin`` is what new loops' hooks are made
of, so each test picks a path by setting it before the loop is made.  These tests need the
extension built; the rest of the suite runs on whichever path the process selected
(``LOOPSCOPE_PURE_PYTHON=1`` forces the pure one).
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import loopscope
from loopscope import _hotpath, _installation
from loopscope._stats import LoopStats

from .conftest import make_loop

speedups = pytest.importorskip("loopscope._speedups")

PATHS = ["c", "pure"]
HIST = "asyncio_loop_callback_duration_seconds"


@pytest.fixture(name="path", params=PATHS)
def fixture_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Select the C or the pure-Python hooks for loops made in this test."""
    monkeypatch.setattr(_hotpath, "twin", speedups if request.param == "c" else _hotpath.pure)
    return str(request.param)


def _figures(registry: CollectorRegistry, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in (
        "asyncio_loop_task_steps_total",
        "asyncio_loop_slow_callbacks_total",
        "asyncio_tasks_created_total",
    ):
        out[name] = registry.get_sample_value(name, {"loop": label}) or 0.0
    out["callbacks"] = registry.get_sample_value(HIST + "_count", {"loop": label}) or 0.0
    out["delays"] = (
        registry.get_sample_value("asyncio_loop_schedule_delay_seconds_count", {"loop": label})
        or 0.0
    )
    return out


def _workload(loop_kind: str, registry: CollectorRegistry) -> tuple[dict[str, float], list[Any]]:
    loopscope.install(registry=registry, loop_name="w", slow_threshold=0.02)
    loop = make_loop(loop_kind)
    ran: list[int] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    def plain(i: int) -> None:
        ran.append(i)

    def slow() -> None:
        time.sleep(0.03)

    async def main() -> None:
        running = asyncio.get_running_loop()
        for i in range(50):
            running.call_soon(plain, i)
        running.call_later(0.001, plain, -1)
        running.call_at(running.time() + 0.001, plain, -2)
        running.call_soon(slow)
        await asyncio.gather(*(worker(20) for _ in range(10)))
        await asyncio.sleep(0.01)

    try:
        with capture_logs() as logs:
            loop.run_until_complete(main())
        figures = _figures(registry, "w")
    finally:
        loop.close()
        loopscope.uninstall()
    assert len(ran) == 52
    varying = ("duration", "blocking_stack", "location", "started")
    events = [
        {k: v for k, v in e.items() if k not in varying}
        for e in logs
        if e.get("event") == "slow_callback"
    ]
    return figures, events


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_same_figures_and_events_on_both_paths(
    loop_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = {}
    for path in PATHS:
        monkeypatch.setattr(_hotpath, "twin", speedups if path == "c" else _hotpath.pure)
        results[path] = _workload(loop_kind, CollectorRegistry())
    c_figures, c_events = results["c"]
    pure_figures, pure_events = results["pure"]
    assert c_figures == pure_figures
    assert c_figures["asyncio_loop_task_steps_total"] >= 200
    assert c_figures["asyncio_loop_slow_callbacks_total"] == 1
    assert c_events == pure_events and len(c_events) == 1


def test_hooks_are_the_c_ones(path: str, loop_kind: str, registry: CollectorRegistry) -> None:
    loopscope.install(registry=registry)
    loop = make_loop(loop_kind)
    try:
        name = "call_soon" if loop_kind == "uvloop" else "_call_soon"
        hook = getattr(loop, name)
        kinds = (speedups.Intercept, speedups.CallSoon)
        assert isinstance(hook, kinds) == (path == "c")
        assert isinstance(loop.create_task, speedups.CreateTask) == (path == "c")
    finally:
        loop.close()


def test_uvloop_io_is_timed_in_c(path: str, registry: CollectorRegistry) -> None:
    """On uvloop, protocol methods get the C I/O wrapper on the C path; on both paths a
    slow data_received, which libuv calls directly, is measured as one slow step."""
    loopscope.install(registry=registry, slow_threshold=0.02, events="off")
    loop = make_loop("uvloop")
    seen: list[object] = []

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport

        def data_received(self, data: bytes) -> None:
            seen.append(type(self.__dict__["data_received"]))
            time.sleep(0.03)
            self.transport.write(data)

    async def main() -> None:
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        server.close()
        await server.wait_closed()

    try:
        probe = _installation.current().probe_for(loop)  # type: ignore[union-attr]
        assert probe is not None
        loop.run_until_complete(main())
        kind = speedups.TimedIO if path == "c" else _hotpath.pure.TimedIO
        assert seen == [kind]
        assert probe.stats.slow_callbacks == 1
        assert probe.stats.blocked_seconds >= 0.03
        assert probe.recorder.current_start == 0.0
    finally:
        loop.close()


def test_recorder_matches_after_step() -> None:
    """Recorder.record + flush gives the figures of a reference computed with bisect."""

    class FakeProbe:
        pass

    task_types = (asyncio.Task,)
    recorder = speedups.Recorder(FakeProbe(), time.monotonic, 100.0, True, task_types)
    stats = LoopStats()
    expected = LoopStats()
    from bisect import bisect_left

    from loopscope._stats import BUCKETS

    # every bound, the doubles either side of it, and values across every power of two
    samples = [0.0, 2e-7, 11.0, 99.0]
    for bound in BUCKETS:
        samples += [math.nextafter(bound, 0.0), bound, math.nextafter(bound, math.inf)]
    samples += [2.0**e * m for e in range(-20, 6) for m in (1.0, 1.3, 1.9999)]
    for duration in samples:
        # ready, start and end chosen so that the duration and the delay are exact
        recorder.record(print, -duration, 0.0, duration)
        expected.callback_duration.counts[bisect_left(BUCKETS, duration)] += 1
        expected.callback_duration.total += duration
        expected.schedule_delay.counts[bisect_left(BUCKETS, duration)] += 1
        expected.schedule_delay.total += duration
        expected.busy_seconds += duration
    assert recorder.pending()
    recorder.flush(stats)
    assert not recorder.pending()
    assert stats.callback_duration.counts == expected.callback_duration.counts
    assert stats.schedule_delay.counts == expected.schedule_delay.counts
    assert stats.callback_duration.total == pytest.approx(expected.callback_duration.total)
    assert stats.busy_seconds == pytest.approx(expected.busy_seconds)
    assert stats.task_steps == 0


def test_recorder_markers_are_attributes() -> None:
    """The recorder's step markers read and write like the probe's own attributes."""

    class FakeProbe:
        pass

    recorder = speedups.Recorder(FakeProbe(), time.monotonic, 0.1, False, (asyncio.Task,))
    assert recorder.current_start == 0.0 and recorder.current_callback is None
    step = object()
    before = sys.getrefcount(step)
    recorder.current_start, recorder.current_callback = 12.5, step
    assert recorder.current_start == 12.5 and recorder.current_callback is step
    recorder.current_start, recorder.current_callback = 0.0, None
    assert recorder.current_callback is None and sys.getrefcount(step) == before
    with pytest.raises(TypeError):
        recorder.current_start = "soon"
    with pytest.raises(AttributeError):
        del recorder.current_start
    assert recorder.current_start == 0.0


def test_step_markers(path: str, loop_kind: str, registry: CollectorRegistry) -> None:
    """The watchdog's markers: current_start/current_callback during a step, 0.0 after."""
    loopscope.install(registry=registry)
    loop = make_loop(loop_kind)
    seen: list[tuple[float, object]] = []

    def callback() -> None:
        probe = _installation.current().probe_for(loop)  # type: ignore[union-attr]
        assert probe is not None
        seen.append((probe.recorder.current_start, probe.recorder.current_callback))

    async def main() -> None:
        asyncio.get_running_loop().call_soon(callback)
        await asyncio.sleep(0)

    try:
        loop.run_until_complete(main())
        probe = _installation.current().probe_for(loop)  # type: ignore[union-attr]
        assert probe is not None
        assert seen and seen[0][0] > 0.0 and seen[0][1] is callback
        assert probe.recorder.current_start == 0.0 and probe.recorder.current_callback is None
        # the markers are the recorder's, of the twin the path selected
        assert type(probe.recorder) is (speedups if path == "c" else _hotpath.pure).Recorder
    finally:
        loop.close()


def test_exceptions_and_repr_reach_the_app(
    path: str, loop_kind: str, registry: CollectorRegistry
) -> None:
    loopscope.install(registry=registry)
    loop = make_loop(loop_kind)
    caught: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: caught.append(context))
    error = ValueError("boom")

    def fails() -> None:
        raise error

    async def main() -> None:
        asyncio.get_running_loop().call_soon(fails)
        await asyncio.sleep(0.001)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert len(caught) == 1 and caught[0]["exception"] is error
    assert "fails" in repr(caught[0]["handle"])
    if path == "c" and loop_kind == "uvloop":
        wrapped = speedups.TimedCallback(fails, _any_recorder(), 0.0)
        assert repr(wrapped) == repr(fails)


def _any_recorder() -> Any:
    class FakeProbe:
        pass

    return speedups.Recorder(FakeProbe(), time.monotonic, 1.0, False, (asyncio.Task,))


def test_odd_calls_raise_what_the_pure_path_raises(
    loop_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages: dict[str, list[str]] = {}
    for path in PATHS:
        monkeypatch.setattr(_hotpath, "twin", speedups if path == "c" else _hotpath.pure)
        loopscope.install(registry=CollectorRegistry())
        loop = make_loop(loop_kind)
        got = messages[path] = []
        calls: list[Callable[[Any], object]] = [
            lambda lp: lp.call_soon(),
            lambda lp: lp.call_soon(print, 1, bogus=2),
            lambda lp: lp.call_later("soon", print),
            lambda lp: lp.call_later(None, print),
        ]
        for call in calls:
            try:
                call(loop)
                got.append("ok")
            except Exception as exc:
                got.append(f"{type(exc).__name__}: {exc}")
        loop.close()
        loopscope.uninstall()
    assert messages["c"] == messages["pure"]


def test_call_soon_threadsafe_from_threads(
    path: str, loop_kind: str, registry: CollectorRegistry
) -> None:
    loopscope.install(registry=registry, loop_name="t")
    loop = make_loop(loop_kind)
    per_thread, threads = 2000, 4
    hits: list[int] = []

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        def hit() -> None:
            hits.append(1)
            if len(hits) == per_thread * threads and not done.done():
                done.set_result(None)

        def feed() -> None:
            for _ in range(per_thread):
                loop.call_soon_threadsafe(hit)

        workers = [threading.Thread(target=feed) for _ in range(threads)]
        for w in workers:
            w.start()
        await done
        for w in workers:
            w.join()

    # the schedule-delay histogram counts scheduled callbacks only (not the self-pipe's
    # I/O callbacks that each wake-up from another thread runs)
    delays = "asyncio_loop_schedule_delay_seconds_count"
    before = registry.get_sample_value(delays, {"loop": "t"}) or 0.0
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    after = registry.get_sample_value(delays, {"loop": "t"}) or 0.0
    assert len(hits) == per_thread * threads
    # every one of them was timed, plus the few steps of main() and the loop's own
    assert per_thread * threads <= after - before <= per_thread * threads + 20


def test_scrape_from_another_thread_while_running(
    path: str, loop_kind: str, registry: CollectorRegistry
) -> None:
    """Scrapes during the run (which fold the C figures in) lose and double nothing."""
    loopscope.install(registry=registry, loop_name="s")
    loop = make_loop(loop_kind)
    stop = threading.Event()
    seen: list[float] = []

    def scraper() -> None:
        while not stop.is_set():
            seen.append(
                registry.get_sample_value("asyncio_loop_task_steps_total", {"loop": "s"}) or 0.0
            )

    async def worker() -> None:
        for _ in range(2000):
            await asyncio.sleep(0)

    async def storm() -> None:
        await asyncio.gather(*(worker() for _ in range(10)))

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        loop.run_until_complete(storm())
    finally:
        stop.set()
        thread.join()
        loop.close()
    assert seen == sorted(seen)
    total = registry.get_sample_value("asyncio_loop_task_steps_total", {"loop": "s"})
    assert total == 10 * 2001 + 2  # the workers' steps and storm()'s two


def _refcount_workload(loop: asyncio.AbstractEventLoop, callback: Any, arg: Any, n: int) -> None:
    async def main() -> None:
        running = asyncio.get_running_loop()
        for _ in range(n):
            running.call_soon(callback, arg)
            running.call_later(0.0, callback, arg)
            await running.create_task(asyncio.sleep(0, arg))
        threading.Thread(
            target=lambda: [loop.call_soon_threadsafe(callback, arg) for _ in range(n)]
        ).start()
        while callback.calls < 3 * n:
            await asyncio.sleep(0.001)

    loop.run_until_complete(main())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_no_reference_leaks(
    loop_kind: str, monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry
) -> None:
    monkeypatch.setattr(_hotpath, "twin", speedups)
    loopscope.install(registry=registry)
    loop = make_loop(loop_kind)
    loop.set_exception_handler(lambda _l, _c: None)

    class Callback:
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, arg: object) -> None:
            self.calls += 1
            if self.calls % 7 == 0:
                raise KeyError(arg)  # the exception path must not leak either

    arg = object()
    try:
        warm = Callback()
        _refcount_workload(loop, warm, arg, 200)
        gc.collect()
        callback = Callback()
        counts = (sys.getrefcount(callback), sys.getrefcount(arg))
        objects = len(gc.get_objects())
        _refcount_workload(loop, callback, arg, 3000)
        gc.collect()
        assert (sys.getrefcount(callback), sys.getrefcount(arg)) == counts
        assert len(gc.get_objects()) - objects < 1000  # 9000 callbacks ran
        total = getattr(sys, "gettotalrefcount", None)
        if total is not None:  # debug builds of CPython
            before = total()
            _refcount_workload(loop, callback, arg, 3000)
            gc.collect()
            assert total() - before < 200
    finally:
        loop.close()


def test_c_objects_are_collected(path: str, loop_kind: str, registry: CollectorRegistry) -> None:
    """A closed, dropped loop takes its C hooks and recorder with it (they are GC-aware)."""
    import weakref

    loopscope.install(registry=registry)
    loop = make_loop(loop_kind)
    loop.run_until_complete(asyncio.sleep(0))
    probe = _installation.current().probe_for(loop)  # type: ignore[union-attr]
    ref = weakref.ref(probe)
    loop.close()
    del loop, probe
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("value", ["1", "true"])
def test_pure_python_forced_by_the_variable(value: str) -> None:
    code = "from loopscope import _hotpath; print(_hotpath.twin is _hotpath.pure)"
    env = dict(os.environ, LOOPSCOPE_PURE_PYTHON=value)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "True"
    env.pop("LOOPSCOPE_PURE_PYTHON")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_a_stale_build_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An accelerator built from other sources (another INTERFACE) is refused, with a
    warning that says so, and the pure-Python hooks run."""
    monkeypatch.delenv("LOOPSCOPE_PURE_PYTHON", raising=False)
    assert _hotpath.load() is speedups
    monkeypatch.setattr(speedups, "INTERFACE", _hotpath.pure.INTERFACE - 1)
    with caplog.at_level("WARNING", logger="loopscope"):
        assert _hotpath.load() is _hotpath.pure
    assert "built from other sources" in caplog.text


_BOUNDS_SCRIPT = """
import math, os, sys, time
from bisect import bisect_left
import loopscope._stats as stats
stats.BUCKETS = BOUNDS
try:
    from loopscope import _speedups
except ImportError as exc:
    from loopscope import _hotpath
    os.environ.pop("LOOPSCOPE_PURE_PYTHON")
    print("ImportError" if _hotpath.load() is _hotpath.pure else "loaded", exc)
    sys.exit(0)
recorder = _speedups.Recorder(object(), time.monotonic, math.inf, False, ())
want = [0] * _speedups.NBUCKETS
samples = [0.0, 1e-9, 1e9]
for bound in stats.BUCKETS:
    samples += [math.nextafter(bound, 0.0), bound, math.nextafter(bound, math.inf)]
samples += [2.0**e * m for e in range(-40, 40) for m in (1.0, 1.3, 1.9999)]
for duration in samples:
    recorder.record_io(print, 0.0, duration)
    want[bisect_left(stats.BUCKETS, duration)] += 1
got = stats.LoopStats()
recorder.flush(got)
print("same" if got.callback_duration.counts == want else f"{got.callback_duration.counts} {want}")
"""


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        ("tuple(b / 7 for b in stats.BUCKETS)", "same"),
        ("tuple(b * 1000 for b in stats.BUCKETS)", "same"),
        ("stats.BUCKETS[:-1]", "ImportError"),
        ("stats.BUCKETS[:1] + (stats.BUCKETS[0] * 1.5,) + stats.BUCKETS[2:]", "ImportError"),
        ("stats.BUCKETS[:-1] + (math.inf,)", "ImportError"),
        ("(-1.0,) + stats.BUCKETS[1:]", "ImportError"),
        ("('a',) * len(stats.BUCKETS)", "ImportError"),
    ],
)
def test_bucket_bounds_come_from_stats(bounds: str, expected: str) -> None:
    """The C module's buckets are loopscope._stats.BUCKETS, read when it is imported; bounds
    its search cannot use fail the import with an ImportError (the pure path is used)."""
    env = dict(os.environ, LOOPSCOPE_PURE_PYTHON="1")  # nothing imports _speedups first
    out = subprocess.run(
        [sys.executable, "-c", _BOUNDS_SCRIPT.replace("BOUNDS", bounds, 1)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split(" ", 1)[0].strip() == expected, out.stdout
    if expected == "ImportError":
        assert "loopscope._stats.BUCKETS" in out.stdout
        # the loader says why the accelerator it found is not used
        assert "the C accelerator could not be loaded" in out.stderr, out.stderr


def test_create_task_counts_and_forwards(
    path: str, loop_kind: str, registry: CollectorRegistry
) -> None:
    """create_task passes every argument to the loop's own, raises what it raises, counts
    only the tasks made, and in debug mode a task's _source_traceback ends at the caller."""
    loopscope.install(registry=registry)
    loop = make_loop(loop_kind)
    loop.set_debug(True)

    async def work(value: int) -> int:
        return value

    def create_here() -> Any:
        return loop.create_task(work(7), name="seven")

    try:
        task = create_here()
        assert task.get_name() == "seven" and loop.run_until_complete(task) == 7
        assert task._source_traceback[-1][2] == "create_here"
        with pytest.raises(TypeError):
            loop.create_task(None)  # type: ignore[arg-type]
        coro = work(1)
        with pytest.raises(TypeError):
            loop.create_task(coro, bogus=True)  # type: ignore[call-arg]
        coro.close()
        assert "create_task" in repr(loop.create_task)
        loop.run_until_complete(asyncio.sleep(0))  # a second task, made by the loop
        assert registry.get_sample_value("asyncio_tasks_created_total", {"loop": "MainThread"}) == 2
    finally:
        loop.close()


def test_debug_source_traceback_ends_at_the_caller(
    path: str, loop_kind: str, registry: CollectorRegistry
) -> None:
    """In debug mode a handle's _source_traceback ends at the line that called call_soon."""
    loopscope.install(registry=registry)
    loop = make_loop(loop_kind)
    loop.set_debug(True)
    try:

        def schedule_here() -> Any:
            return loop.call_soon(print)

        handle = schedule_here()
        assert handle._source_traceback[-1][2] == "schedule_here"
        handle.cancel()
    finally:
        loop.close()
