"""Exemplars: the trace of a task step that landed in a callback-duration bucket, or was slow.

When ``opentelemetry-api`` is installed, the hot path offers the probe the task steps that
ran for ``EXEMPLAR_FLOOR`` or longer (one comparison per step, made anyway for the slow
threshold); shorter steps are never looked at.  For an offered step, the probe asks
:func:`span_ids` for the span that was current in the task: OpenTelemetry keeps it in a
context variable, and at the end of a step the loop is back in its own context, so the
task's context is read (``Task.get_context()`` on 3.12+, ``_context`` on a Python task, the
context the C task holds on 3.10 and 3.11) and the span looked up inside it.  A request
whose span ends in the very step that blocked has no span left at the step's end: for slow
steps, the watchdog notes the span while the step runs, when it takes the stack.

Per bucket (and for the slow-step counter) the slowest step of the last ``WINDOW`` seconds
is kept.  A step that is not slower than the one kept costs a comparison; the others cost a
span lookup, at most ``LOOKUPS_PER_WINDOW`` per bucket per window (slow steps aside), so a
storm of 2 ms steps outside any span costs a few lookups every few seconds, not one per
step.  OpenTelemetry is never imported here: until the application has imported
``opentelemetry.trace`` there is no span to find, and an offered step costs a dict lookup.
"""

from __future__ import annotations

import contextvars
import functools
import gc
import importlib.util
import sys
import time
from types import ModuleType
from typing import Any

from ._stats import EXEMPLAR_WINDOW as WINDOW
from ._stats import StepExemplar

__all__ = [
    "EXEMPLAR_FLOOR",
    "LOOKUPS_PER_WINDOW",
    "SLOW",
    "WINDOW",
    "Sampler",
    "span_ids",
    "tracing_api",
    "tracing_installed",
]

#: Task steps shorter than this (seconds) never carry an exemplar: following a sub-millisecond
#: step to its trace rarely helps, and looking at them would cost on every step.
EXEMPLAR_FLOOR = 0.001
#: Span lookups per bucket per window.
LOOKUPS_PER_WINDOW = 4
#: The key of the slow-step counter's exemplar (the buckets' keys are their indexes).
SLOW = -1


@functools.cache
def tracing_installed() -> bool:
    """Whether ``opentelemetry-api`` is installed (looked up once, never imported here)."""
    try:
        return importlib.util.find_spec("opentelemetry") is not None
    except (ImportError, ValueError):
        return False


def tracing_api() -> ModuleType | None:
    """``opentelemetry.trace`` once the application has imported it: a service that traces
    has, and loopscope never imports it (about 0.2 s on the loop's thread, for nothing in a
    service that does not trace)."""
    return sys.modules.get("opentelemetry.trace")


def _task_context(task: Any) -> contextvars.Context | None:
    get_context = getattr(task, "get_context", None)
    if get_context is not None:
        context = get_context()
        return context if isinstance(context, contextvars.Context) else None
    context = getattr(task, "_context", None)
    if isinstance(context, contextvars.Context):
        return context
    # 3.10 and 3.11's C task keeps its context without showing it; the garbage collector's
    # view of what the task refers to includes it.
    for referent in gc.get_referents(task):
        if isinstance(referent, contextvars.Context):
            return referent
    return None


def span_ids(trace_api: ModuleType, task: Any) -> tuple[str, str] | None:
    """The ids of the recording span current in ``task``, if any.  Reads the task's context
    without entering it, so it works at the end of a step (the loop back in its own context)
    and from another thread while the step runs (the watchdog's)."""
    context = _task_context(task)
    if context is None:
        return None
    otel_context_type = sys.modules["opentelemetry.context"].Context  # trace imports it
    for value in list(context.values()):
        if isinstance(value, otel_context_type):
            span = trace_api.get_current_span(value)
            break
    else:
        return None
    if not span.is_recording():
        return None
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return None
    return f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}"


class Sampler:
    """The exemplars of one loop, written by its thread only."""

    __slots__ = ("budget",)

    def __init__(self) -> None:
        #: Per key: (start of its lookup window, monotonic seconds; lookups in it).
        self.budget: dict[int, tuple[float, int]] = {}

    def offer(
        self,
        kept: dict[int, StepExemplar],
        keys: tuple[int, ...],
        task: Any,
        duration: float,
        seen: tuple[str, str] | None = None,
    ) -> None:
        """A step of ``task`` that ran for ``duration`` seconds: keep it under each of
        ``keys`` where it is the slowest recent one and a recording span was current (at its
        end, or ``seen`` while it ran: the span a slow step ended before it returned)."""
        now = time.time()
        wanted = [
            key
            for key in keys
            if (held := kept.get(key)) is None
            or now - held.timestamp >= WINDOW
            or duration > held.duration
        ]
        trace_api = tracing_api()
        if not wanted or trace_api is None:
            return
        if SLOW not in keys:  # slow steps are rare and costly already: never rationed
            monotonic = time.monotonic()
            key = wanted[0]
            start, used = self.budget.get(key, (monotonic, 0))
            if monotonic - start >= WINDOW:
                start, used = monotonic, 0
            if used >= LOOKUPS_PER_WINDOW:
                return
            self.budget[key] = (start, used + 1)
        ids = span_ids(trace_api, task) or seen
        if ids is None:
            return
        exemplar = StepExemplar(ids[0], ids[1], duration, now)
        for key in wanted:
            kept[key] = exemplar
