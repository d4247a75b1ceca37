"""The watchdog's wait in C (``_speedups.watch_steps``): it sleeps without the GIL, reading
the start slots of the C recorders, and hands over to the Python check when a step has run
long enough, when woken, or when its timeout ends."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import loopscope
from loopscope import _probe

from .conftest import make_loop

speedups = pytest.importorskip("loopscope._speedups")


class _Probe:
    pass


def _recorder(clock: Any = time.monotonic) -> Any:
    return speedups.Recorder(_Probe(), clock, 1.0, True, (asyncio.Task,))


@pytest.fixture(name="wake")
def fixture_wake() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def test_returns_when_a_step_runs_long(wake: tuple[int, int]) -> None:
    recorder = _recorder()
    assert recorder.watched
    recorder.current_start = time.monotonic() - 5.0
    try:
        assert speedups.watch_steps(1.0, 0.001, 10.0, wake[0]) is True
    finally:
        recorder.current_start = 0.0


def test_a_short_step_is_not_long(wake: tuple[int, int]) -> None:
    recorder = _recorder()
    recorder.current_start = time.monotonic()
    try:
        # the step started now: within a 20 ms timeout it never runs for 10 s
        assert speedups.watch_steps(10.0, 0.001, 0.02, wake[0]) is False
    finally:
        recorder.current_start = 0.0


def test_woken_through_the_pipe(wake: tuple[int, int]) -> None:
    result: list[bool] = []
    thread = threading.Thread(
        target=lambda: result.append(speedups.watch_steps(1.0, 0.01, 60.0, wake[0]))
    )
    thread.start()
    time.sleep(0.05)
    os.write(wake[1], b"\0\0\0")
    thread.join(timeout=10)
    assert not thread.is_alive() and result == [False]
    with pytest.raises(BlockingIOError):  # the pipe was drained
        os.read(wake[0], 1)


def test_other_clocks_and_freed_slots_are_not_watched(wake: tuple[int, int]) -> None:
    fake = _recorder(clock=lambda: 0.0)
    assert not fake.watched
    fake.current_start = 1.0  # on its own clock: never read by watch_steps
    assert speedups.watch_steps(0.0, 0.001, 0.005, wake[0]) is False
    watched = _recorder()
    watched.current_start = time.monotonic() - 5.0
    del watched  # its slot is freed and cleared
    gc.collect()
    assert speedups.watch_steps(0.0, 0.001, 0.005, wake[0]) is False


def test_slots_run_out_and_come_back() -> None:
    recorders = [_recorder() for _ in range(1100)]
    unwatched = [r for r in recorders if not r.watched]
    assert len(unwatched) >= 1100 - 1024
    del recorders, unwatched
    gc.collect()
    assert _recorder().watched


def test_bad_arguments(wake: tuple[int, int]) -> None:
    with pytest.raises(TypeError, match="4 arguments"):
        speedups.watch_steps(1.0, 1.0, 1.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="interval must be positive"):
        speedups.watch_steps(1.0, 0.0, 1.0, wake[0])
    with pytest.raises(TypeError):
        speedups.watch_steps("x", 1.0, 1.0, wake[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        speedups.watch_steps(1.0, 0.001, 1.0, -5)
    closed_read, closed_write = os.pipe()
    os.close(closed_read)
    os.close(closed_write)
    with pytest.raises(OSError):
        speedups.watch_steps(1.0, 0.001, 1.0, closed_read)


def test_watchdog_waits_in_c_and_samples_the_block(
    loop_kind: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the C path the watchdog sleeps in watch_steps, which hands the block over to the
    Python check: the slow step's event has the stack of the line that blocked."""
    monkeypatch.setattr(_probe, "speedups", speedups)
    calls: list[bool] = []
    real = speedups.watch_steps

    def spy(*args: Any) -> bool:
        result: bool = real(*args)
        calls.append(result)
        return result

    monkeypatch.setattr(speedups, "watch_steps", spy)
    loopscope.install(registry=registry, slow_threshold=0.04)
    loop = make_loop(loop_kind)

    def blocking_call() -> None:
        time.sleep(0.2)

    async def main() -> None:
        await asyncio.sleep(0.01)
        blocking_call()

    try:
        with capture_logs() as logs:
            loop.run_until_complete(main())
    finally:
        loop.close()
        loopscope.uninstall()
    assert True in calls, calls
    slow = [e for e in logs if e.get("event") == "slow_callback"]
    assert len(slow) == 1, logs
    assert "blocking_call" in (slow[0].get("location") or ""), slow[0]


def test_a_loop_made_later_is_watched_at_once(
    loop_kind: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop instrumented while the watchdog sleeps in C: its recorder's slot is read from
    the next interval on, so its block is sampled before the once-a-second refresh."""
    monkeypatch.setattr(_probe, "speedups", speedups)
    loopscope.install(registry=registry, slow_threshold=0.04)
    time.sleep(0.05)  # the watchdog is asleep in watch_steps, with no loop
    loop = make_loop(loop_kind)

    def blocking_call() -> None:
        time.sleep(0.15)

    async def main() -> None:
        blocking_call()

    try:
        with capture_logs() as logs:
            loop.run_until_complete(main())
    finally:
        loop.close()
        loopscope.uninstall()
    slow = [e for e in logs if e.get("event") == "slow_callback"]
    assert len(slow) == 1 and "blocking_call" in (slow[0].get("location") or ""), logs
