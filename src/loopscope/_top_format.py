"""How ``loopscope top`` writes its figures as text: durations, one line per loop or
event, sparklines, and the sorts of the loop table.  Shared by the plain output
(:mod:`._top`) and the terminal view (:mod:`._top_view`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ._top_figures import LoopRates

__all__ = ["SORTS", "event_duration", "event_what", "plain_event", "plain_row", "seconds_text",
           "sparkline"]  # fmt: skip

#: What ``s`` cycles through: the column name and how a row sorts (largest first).
SORTS: tuple[tuple[str, Callable[[LoopRates], Any]], ...] = (
    ("lag p99", lambda r: -(r.lag_p99 or 0.0)),
    ("utilization", lambda r: -r.utilization),
    ("slow steps", lambda r: (-r.slow_steps, -r.blocked_seconds)),
    ("steps/s", lambda r: -r.steps_per_second),
    ("loop", lambda r: (r.endpoint, r.loop)),
)
_SPARKS = "▁▂▃▄▅▆▇█"


def seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f}s"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}µs"
    return f"{seconds * 1000:.1f}ms" if seconds < 0.1 else f"{seconds * 1000:.0f}ms"


def plain_row(row: LoopRates) -> str:
    """One loop over one interval, as one line."""
    executors = f"{row.executors_busy:.0f}/{row.executors_max:.0f}" if row.executors_max else "-"
    return (
        f"{row.endpoint} loop={row.loop} ({row.implementation}) "
        f"lag_p50={seconds_text(row.lag_p50)} lag_p99={seconds_text(row.lag_p99)} "
        f"util={row.utilization:.0%} "
        f"steps/s={row.steps_per_second:.0f} tasks={row.tasks_alive:.0f} "
        f"created/s={row.tasks_created_per_second:.0f} slow={row.slow_steps:.0f} "
        f"blocked={row.blocked_seconds:.3f}s executors={executors} "
        f"queue_p99={seconds_text(row.queue_p99)}"
    )


def event_what(event: dict[str, Any]) -> str:
    """``task Task-6 (_handle)`` or ``callback ...``: what ran."""
    if event.get("kind") == "task":
        coro = event.get("coro")
        return f"task {event.get('task')}" + (f" ({coro})" if coro else "")
    return f"callback {event.get('callback')}"


def event_duration(event: dict[str, Any]) -> str:
    """``250ms`` for a slow step, ``1.00s so far`` for a loop still blocked."""
    if event.get("event") == "loop_blocked":
        return f"{seconds_text(_number(event.get('blocked_for')))} so far"
    return seconds_text(_number(event.get("duration")))


def _number(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def plain_event(event: dict[str, Any]) -> str:
    """A line for one event: ``  slow step 250ms in task ... at app.py:42 in get_user``."""
    head = "loop blocked" if event.get("event") == "loop_blocked" else "slow step"
    where = event.get("location") or "(ended before its stack was taken)"
    return (
        f"  {head} {event_duration(event)} on {event.get('endpoint')} loop "
        f"{event.get('loop')} in {event_what(event)} at {where}"
    )


def sparkline(values: Iterable[float | None], width: int, top: float | None = None) -> str:
    """The last ``width`` values as a line of block characters, scaled to ``top`` (else the
    largest value); a gap is a space."""
    points = list(values)[-width:] if width > 0 else []
    known = [v for v in points if v is not None]
    scale = top if top is not None else (max(known) if known else 0.0)
    line = []
    for value in points:
        if value is None:
            line.append(" ")
        elif scale <= 0:
            line.append(_SPARKS[0])
        else:
            index = round(min(1.0, value / scale) * (len(_SPARKS) - 1))
            line.append(_SPARKS[index])
    return "".join(line)
