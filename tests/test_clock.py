"""The C accelerator's native clock (``_c/clock.c``): time.monotonic() read from the
processor's time-stamp counter where the kernel keeps CLOCK_MONOTONIC with it.

These check that what it hands out is time.monotonic()'s time, that it never goes back,
and that a counter that stops keeping time is caught and given up.
"""

from __future__ import annotations

import asyncio
import platform
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import loopscope
from loopscope import _hotpath

from .conftest import make_loop

speedups = pytest.importorskip("loopscope._speedups")

CLOCKSOURCE = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
# How far a native reading may lie outside the two time.monotonic() readings around it.
# The counter's measured rate and the pair it was anchored on are good to well under a
# microsecond here; a wrong rate (off by 1%) would be off by milliseconds within a second.
TOLERANCE = 100e-6


def _counter_expected() -> bool:
    try:
        source = CLOCKSOURCE.read_text().strip()
    except OSError:
        return False
    return (
        sys.platform == "linux"
        and platform.machine() == "x86_64"
        and not sysconfig.get_config_var("Py_GIL_DISABLED")
        and source == "tsc"
    )


@pytest.fixture(autouse=True)
def _fresh_clock() -> Iterator[None]:
    speedups._clock_reset()
    yield
    speedups._clock_reset()


def _until_calibrated() -> None:
    deadline = time.monotonic() + 2.0
    while not speedups.clock_info()["calibrated"]:
        speedups.clock_now()
        assert time.monotonic() < deadline, speedups.clock_info()


def _check_agreement(seconds: float) -> int:
    """Read both clocks in turn for `seconds`; every native reading lies between the two
    monotonic readings around it, and none is below the one before it."""
    end = time.monotonic() + seconds
    previous = 0.0
    reads = 0
    while True:
        before = time.monotonic()
        native = speedups.clock_now()
        after = time.monotonic()
        assert before - TOLERANCE <= native <= after + TOLERANCE, (
            before,
            native,
            after,
            speedups.clock_info(),
        )
        assert native >= previous, (previous, native)
        previous = native
        reads += 1
        if after > end:
            return reads


def test_source_is_the_counter_where_the_kernel_uses_it() -> None:
    info = speedups.clock_info()
    assert info["source"] == ("tsc" if _counter_expected() else "clock_gettime"), info
    assert info["faults"] == 0


def test_keeps_time_with_monotonic() -> None:
    # 2.3 s: the first measurement of the rate (10 ms), the horizons that grow from it, and
    # two re-anchors at the full second.
    reads = _check_agreement(2.3)
    info = speedups.clock_info()
    assert reads > 1000
    if info["source"] == "tsc":
        assert info["calibrated"], info
        assert info["faults"] == 0, info
        assert 1e8 < info["counter_hz"] < 1e11, info
        # most reads were the counter's: far fewer pairs taken than reads
        assert info["anchors"] < reads / 2, (info, reads)


@pytest.mark.parametrize("jump", [0.5, -0.5, 0.002])
def test_a_counter_that_jumps_is_caught(jump: float) -> None:
    if speedups.clock_info()["source"] != "tsc":
        pytest.skip("the counter is not used on this machine")
    _until_calibrated()
    speedups._clock_skew(jump)
    before = time.monotonic()
    native = speedups.clock_now()
    after = time.monotonic()
    # the jump is seen at the very next reading: it is not handed out
    assert before - TOLERANCE <= native <= after + TOLERANCE
    info = speedups.clock_info()
    assert info["faults"] == 1 and info["source"] == "tsc", info
    _check_agreement(0.05)


def test_given_up_after_three_faults() -> None:
    if speedups.clock_info()["source"] != "tsc":
        pytest.skip("the counter is not used on this machine")
    for fault in range(1, 4):
        _until_calibrated()
        speedups._clock_skew(1.0)
        speedups.clock_now()
        assert speedups.clock_info()["faults"] == fault
    info = speedups.clock_info()
    assert info["source"] == "clock_gettime" and not info["calibrated"], info
    _check_agreement(0.05)
    with pytest.raises(RuntimeError, match="not in use"):
        speedups._clock_skew(1.0)


def test_steps_timed_on_the_counter(
    loop_kind: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 30 ms block measured by the C hooks on the native clock, the counter's rate being
    measured while the loop runs."""
    monkeypatch.setattr(_hotpath, "twin", speedups)  # the C hooks, on the pure run too
    loopscope.install(registry=registry, loop_name="clk", slow_threshold=10.0)
    loop = make_loop(loop_kind)

    async def main() -> None:
        for _ in range(200):
            await asyncio.sleep(0)
        time.sleep(0.03)
        for _ in range(200):
            await asyncio.sleep(0)

    try:
        started = time.monotonic()
        loop.run_until_complete(main())
        elapsed = time.monotonic() - started
        loop.close()
        name = "asyncio_loop_callback_duration_seconds"
        total = registry.get_sample_value(name + "_sum", {"loop": "clk"})
        within = registry.get_sample_value(name + "_bucket", {"loop": "clk", "le": "0.025"})
        count = registry.get_sample_value(name + "_count", {"loop": "clk"})
    finally:
        loop.close()
        loopscope.uninstall()
    assert total is not None and within is not None and count is not None
    assert 0.03 <= total <= elapsed, (total, elapsed)
    assert count - within == 1  # the one blocked step, and only it, is past 25 ms
    assert speedups.clock_info()["faults"] == 0
