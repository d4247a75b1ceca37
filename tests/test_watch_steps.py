"""The watchdog's wait in C (``_speedups.watch_steps``): it sleeps without the GIL, reading
the start slots of the C recorders, and hands over to the Python check when a step has run
long enough, when woken, or when its timeout ends."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import loopscope
from loopscope import _hotpath

from .conftest import make_loop

speedups = pytest.importorskip("loopscope._speedups")


class _Probe:
    pass


def _recorder(clock: Any = time.monotonic) -> Any:
    return speedups.Recorder(_Probe(), clock, 1.0, True, (asyncio.Task,))


def test_returns_when_a_step_runs_long() -> None:
    recorder = _recorder()
    assert recorder.watched
    recorder.current_start = time.monotonic() - 5.0
    try:
        assert speedups.watch_steps(1.0, 0.001, 10.0) is True
    finally:
        recorder.current_start = 0.0


def test_a_short_step_is_not_long() -> None:
    recorder = _recorder()
    recorder.current_start = time.monotonic()
    try:
        # the step started now: within a 20 ms timeout it never runs for 10 s
        assert speedups.watch_steps(10.0, 0.001, 0.02) is False
    finally:
        recorder.current_start = 0.0


def test_woken_by_wake_watchers() -> None:
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(speedups.watch_steps(1.0, 0.01, 60.0)))
    thread.start()
    time.sleep(0.05)
    speedups.wake_watchers()
    thread.join(timeout=10)
    assert not thread.is_alive() and result == [False]


def test_other_clocks_and_freed_slots_are_not_watched() -> None:
    fake = _recorder(clock=lambda: 0.0)
    assert not fake.watched
    fake.current_start = 1.0  # on its own clock: never read by watch_steps
    assert speedups.watch_steps(0.0, 0.001, 0.005) is False
    watched = _recorder()
    watched.current_start = time.monotonic() - 5.0
    del watched  # its slot is freed and cleared
    gc.collect()
    assert speedups.watch_steps(0.0, 0.001, 0.005) is False


def test_slots_run_out_and_come_back() -> None:
    recorders = [_recorder() for _ in range(1100)]
    unwatched = [r for r in recorders if not r.watched]
    assert len(unwatched) >= 1100 - 1024
    del recorders, unwatched
    gc.collect()
    assert _recorder().watched


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="3 arguments"):
        speedups.watch_steps(1.0, 1.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="interval must be in"):
        speedups.watch_steps(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="interval must be in"):
        speedups.watch_steps(1.0, 1e9, 1.0)
    with pytest.raises(TypeError):
        speedups.watch_steps("x", 1.0, 1.0)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_waits_and_wakes_in_a_forked_child() -> None:
    """A child forked while another thread sleeps in watch_steps gets a fresh condition
    variable: its own wait and wake work."""
    sleeper = threading.Thread(target=lambda: speedups.watch_steps(1.0, 0.01, 0.3))
    sleeper.start()
    time.sleep(0.02)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            result: list[bool] = []
            thread = threading.Thread(
                target=lambda: result.append(speedups.watch_steps(1.0, 0.01, 30.0))
            )
            thread.start()
            time.sleep(0.05)
            speedups.wake_watchers()
            thread.join(timeout=10)
            code = 0 if result == [False] else 2
        finally:
            os._exit(code)
    sleeper.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _slow_events_of_a_block(loop_kind: str, seconds: float) -> list[dict[str, Any]]:
    """Run a new loop whose task blocks in blocking_call() for `seconds`; the slow_callback
    events logged.  loopscope is installed by the caller and uninstalled here."""
    loop = make_loop(loop_kind)

    def blocking_call() -> None:
        time.sleep(seconds)

    async def main() -> None:
        await asyncio.sleep(0.01)
        blocking_call()

    try:
        with capture_logs() as logs:
            loop.run_until_complete(main())
    finally:
        loop.close()
        loopscope.uninstall()
    return [e for e in logs if e.get("event") == "slow_callback"]


def test_watchdog_waits_in_c_and_samples_the_block(
    loop_kind: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the C path the watchdog sleeps in watch_steps, which hands the block over to the
    Python check: the slow step's event has the stack of the line that blocked."""
    monkeypatch.setattr(_hotpath, "twin", speedups)
    calls: list[bool] = []
    real = speedups.watch_steps

    def spy(*args: Any) -> bool:
        result: bool = real(*args)
        calls.append(result)
        return result

    monkeypatch.setattr(speedups, "watch_steps", spy)
    loopscope.install(registry=registry, slow_threshold=0.04)
    slow = _slow_events_of_a_block(loop_kind, 0.2)
    assert True in calls, calls
    assert len(slow) == 1, slow
    assert "blocking_call" in (slow[0].get("location") or ""), slow[0]


def test_a_loop_made_later_is_watched_at_once(
    loop_kind: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop instrumented while the watchdog sleeps in C: its recorder's slot is read from
    the next interval on, so its block is sampled before the once-a-second refresh."""
    monkeypatch.setattr(_hotpath, "twin", speedups)
    loopscope.install(registry=registry, slow_threshold=0.04)
    time.sleep(0.05)  # the watchdog is asleep in watch_steps, with no loop
    slow = _slow_events_of_a_block(loop_kind, 0.15)
    assert len(slow) == 1 and "blocking_call" in (slow[0].get("location") or ""), slow
