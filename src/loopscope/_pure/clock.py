"""The pure-Python twin of the native clock (``_c/clock.c``): ``time.monotonic`` itself."""

from __future__ import annotations

import time
from typing import Literal, TypedDict

__all__ = ["ClockInfo", "_clock_reset", "_clock_skew", "clock_info", "clock_now"]


class ClockInfo(TypedDict):
    """What clock_info() tells (the same keys in both twins)."""

    source: Literal["tsc", "clock_gettime"]
    calibrated: bool
    counter_hz: float
    anchors: int
    faults: int


def clock_now() -> float:
    """The native clock: here, time.monotonic()."""
    return time.monotonic()


def clock_info() -> ClockInfo:
    """Where clock_now() reads the time: always clock_gettime here (no counter)."""
    return {
        "source": "clock_gettime",
        "calibrated": False,
        "counter_hz": 0.0,
        "anchors": 0,
        "faults": 0,
    }


def _clock_skew(seconds: float, /) -> None:
    """Test hook of the C twin (moves the counter's anchor): there is no counter here."""
    float(seconds)
    raise RuntimeError("the counter is not in use in the pure-Python hot path")


def _clock_reset() -> None:
    """Test hook of the C twin (starts the clock over): nothing to reset here."""
