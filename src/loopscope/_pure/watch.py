"""The pure-Python twin of the watchdog's wait (``_c/watch.c``).

The C wait sleeps without the GIL and reads the recorders' start slots; this one sleeps on
a condition variable, which releases the GIL as well, and reads the recorders' markers
when it wakes every ``interval``.  Each wake takes the GIL back, so the GIL reader (see
``loopscope._gilreader``) is armed for the end of each wait, as the C wait arms it before
it takes the GIL."""

from __future__ import annotations

import math
import os
import threading
import time

from .._gilreader import arm
from .recorder import watched_recorders

__all__ = ["wake_watchers", "watch_steps"]

_condition = threading.Condition(threading.Lock())
_wakes = 0


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"must be real number, not {type(value).__name__}")
    return float(value)


def watch_steps(sample_after: float, interval: float, timeout: float, /) -> bool:
    """The watchdog thread's sleep between its checks: True as soon as a step of a watched
    recorder has run for ``sample_after`` seconds (looked at every ``interval``); False when
    wake_watchers() is called or after ``timeout`` seconds."""
    sample = _seconds(sample_after)
    every = _seconds(interval)
    limit = _seconds(timeout)
    if not (0.0 < every <= 3600.0 and sample >= 0.0 and limit >= 0.0) or math.isnan(sample):
        raise ValueError(
            "watch_steps(): interval must be in (0, 3600] seconds, the others not negative"
        )
    deadline = time.monotonic() + limit
    with _condition:
        seen = _wakes
        while True:
            arm(every)  # it wants the GIL back at the end of this wait
            if _condition.wait_for(lambda: _wakes != seen, every):
                return False
            now = time.monotonic()
            for recorder in list(watched_recorders):
                start = recorder.current_start
                if start and now - start >= sample:
                    return True
            if now >= deadline:
                return False


def wake_watchers() -> None:
    """Make every watch_steps() waiting now return False."""
    global _wakes
    with _condition:
        _wakes += 1
        _condition.notify_all()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the condition's lock at the fork.
    global _condition, _wakes
    _condition = threading.Condition(threading.Lock())
    _wakes = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
