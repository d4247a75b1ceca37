"""Exemplars: a traced task step that is slow, or long enough to be sampled, links its
callback-duration bucket and the slow-step counter to its trace in the OpenMetrics output;
steps under the floor are never looked at, and loopscope imports no OpenTelemetry itself."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import loopscope
from loopscope import _hotpath

Run = Callable[[Callable[[], Awaitable[Any]]], Any]
THRESHOLD = 0.05


def _recorder_types() -> list[Any]:
    types: list[Any] = [pytest.param(_hotpath.pure.Recorder, id="pure")]
    try:
        from loopscope import _speedups
    except ImportError:
        return types
    return [pytest.param(_speedups.Recorder, id="c"), *types]


def _exemplars(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], Any]]]:
    """Per sample name: (labels, exemplar) of every sample that carries one."""
    found: dict[str, list[tuple[dict[str, str], Any]]] = {}
    text = openmetrics.generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.exemplar is not None:
                found.setdefault(sample.name, []).append((sample.labels, sample.exemplar))
    return found


class TestExemplars:
    """Traced steps carry exemplars, on both loops and both hot paths."""

    def test_traced_steps_link_to_their_traces(self, registry: CollectorRegistry, run: Run) -> None:
        """The slow traced step is the slow counter's exemplar and its bucket's, although
        its span ended before the step did; a shorter traced step is its own bucket's; an
        even slower step without a span is none's; the text format shows no exemplar."""
        tracer = TracerProvider().get_tracer("test")
        loopscope.install(registry=registry, slow_threshold=THRESHOLD)
        traces: dict[str, str] = {}

        async def handler(name: str, block: float, then_await: bool) -> None:
            with tracer.start_as_current_span(name) as span:
                traces[name] = format(span.get_span_context().trace_id, "032x")
                await asyncio.sleep(0)
                time.sleep(block)
                if then_await:
                    await asyncio.sleep(0)
            await asyncio.sleep(0)

        async def untraced(block: float) -> None:
            await asyncio.sleep(0)
            time.sleep(block)

        async def main() -> None:
            await handler("short", THRESHOLD / 20, then_await=True)
            # The span ends in the step that blocked: the watchdog saw it while it ran.
            await handler("slow", THRESHOLD * 4, then_await=False)
            await untraced(THRESHOLD * 6)

        run(main)
        found = _exemplars(registry)
        (slow_labels, slow), *others = found["asyncio_loop_slow_callbacks_total"]
        assert not others and slow_labels == {"loop": "MainThread"}
        assert slow.labels["trace_id"] == traces["slow"]
        assert len(slow.labels["span_id"]) == 16 and slow.value >= THRESHOLD * 4
        buckets = {
            labels["le"]: exemplar
            for labels, exemplar in found["asyncio_loop_callback_duration_seconds_bucket"]
        }
        by_trace = {e.labels["trace_id"]: (float(le), e) for le, e in buckets.items()}
        assert set(by_trace) == {traces["short"], traces["slow"]}
        le, exemplar = by_trace[traces["slow"]]
        assert exemplar == slow and exemplar.value <= le
        le, exemplar = by_trace[traces["short"]]
        assert THRESHOLD / 20 <= exemplar.value <= le
        assert b"trace_id" not in generate_latest(registry)

    @pytest.mark.parametrize("recorder_type", _recorder_types())
    def test_only_task_steps_over_the_floor_are_offered(self, recorder_type: Any) -> None:
        """The recorder hands the probe task steps from exemplar_floor up to the threshold,
        and nothing else: shorter steps, callbacks of no task and steps with the floor off
        (the default) never reach Python."""

        class Task:
            def step(self) -> None:
                pass

        class Probe:
            def __init__(self) -> None:
                from loopscope._stats import LoopStats

                self.stats = LoopStats()
                self.offered: list[float] = []
                self.slow: list[float] = []

            def offer_exemplar(
                self, callback: object, task: object, start: float, d: float
            ) -> None:
                assert isinstance(task, Task)
                self.offered.append(d)

            def record_slow(self, callback: object, task: object, start: float, d: float) -> None:
                self.slow.append(d)

        probe = Probe()
        recorder = recorder_type(probe, time.monotonic, 1.0, False, (Task,))
        stats = probe.stats
        for duration in (0.0005, 0.002):
            recorder.record(Task().step, 0.0, 10.0, 10.0 + duration)
        assert probe.offered == []  # the floor is off by default
        recorder.exemplar_floor = 0.001
        for duration in (0.0005, 0.002, 0.5, 2.0):
            recorder.record(Task().step, 0.0, 10.0, 10.0 + duration)
            recorder.record(print, 0.0, 10.0, 10.0 + duration)
        assert [round(d, 6) for d in probe.offered] == [0.002, 0.5]
        assert [round(d, 6) for d in probe.slow] == [2.0, 2.0]
        recorder.flush(stats)


def test_loopscope_imports_no_opentelemetry() -> None:
    """Neither importing loopscope nor instrumenting and running a loop with steps long
    enough to be offered imports an OpenTelemetry package: only an application that traces
    does."""
    code = (
        "import asyncio, sys, time, loopscope\n"
        "loopscope.install()\n"
        "async def main():\n"
        "    time.sleep(0.002)\n"
        "    await asyncio.sleep(0)\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if 'opentelemetry' in m))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
