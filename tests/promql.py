"""PromQL helpers shared by the dashboard and rule tests."""

from __future__ import annotations

import re

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects (function names and labels left out)."""
    text = re.sub(r"#[^\n]*", " ", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', text)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", text)
    text = re.sub(r"(?<![\w:])\d[\w.]*(?:[eE][+-]?\d+)?", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


#: Series loopscope exports (histograms by their sample names); see the README's metric table.
_HISTOGRAMS = (
    "asyncio_loop_callback_duration_seconds",
    "asyncio_loop_schedule_delay_seconds",
    "asyncio_loop_lag_seconds",
    "asyncio_executor_queue_delay_seconds",
    "asyncio_executor_run_duration_seconds",
)
EXPORTED = {f"{h}{suffix}" for h in _HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")} | {
    "asyncio_loop_busy_seconds_total",
    "asyncio_loop_task_steps_total",
    "asyncio_loop_slow_callbacks_total",
    "asyncio_loop_blocked_seconds_total",
    "asyncio_loop_slow_callbacks_by_location_total",
    "asyncio_tasks_created_total",
    "asyncio_tasks",
    "asyncio_loop_info",
    "process_context_switches_total",
    "asyncio_executor_workers_busy",
    "asyncio_executor_workers_max",
}
