"""OpenTelemetry instruments in process: the same figures as the Prometheus collector, fed
per bucket, on a provider passed in or through the instrumentor; and never needed at
import."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import Histogram, MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics._internal.instrument import _Histogram
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from prometheus_client import CollectorRegistry

import loopscope
from loopscope._options import resolve_options
from loopscope._otel import INSTRUMENTS, LOOP
from loopscope._stats import BUCKETS
from loopscope.otel import LoopscopeInstrumentor

from .conftest import HOT_PATH_VARIABLE as HOT_PATH
from .conftest import sample

ROOT = Path(__file__).resolve().parent.parent
Run = Callable[[Callable[[], Awaitable[Any]]], Any]
#: OpenTelemetry histogram -> Prometheus family, for the loop's own histograms.
LOOP_HISTOGRAMS = {
    spec.name: spec.prometheus
    for spec in INSTRUMENTS
    if spec.kind == "histogram" and spec.attributes == (LOOP,)
}
COUNTERS = {
    "loopscope.eventloop.time": "asyncio_loop_busy_seconds_total",
    "loopscope.eventloop.task.steps": "asyncio_loop_task_steps_total",
    "loopscope.eventloop.slow_steps": "asyncio_loop_slow_callbacks_total",
    "loopscope.eventloop.blocked_time": "asyncio_loop_blocked_seconds_total",
    "loopscope.eventloop.task.created": "asyncio_tasks_created_total",
}


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """loopscope's data points by instrument name, from one collection of ``reader``."""
    found: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name == "loopscope":
                for metric in scope_metrics.metrics:
                    found[metric.name] = list(metric.data.data_points)
    return found


def _main_loop(points: list[Any]) -> Any:
    (point,) = [p for p in points if p.attributes.get(LOOP) == "MainThread"]
    return point


def _prometheus_buckets(registry: CollectorRegistry, family: str) -> list[int]:
    """Per-bucket (not cumulative) counts of a loop histogram, +Inf last."""
    cumulative = [
        sample(registry, f"{family}_bucket", loop="MainThread", le=str(bound)) for bound in BUCKETS
    ]
    cumulative.append(sample(registry, f"{family}_count", loop="MainThread"))
    return [int(b - a) for a, b in zip([0.0, *cumulative], cumulative, strict=False)]


def _python(program: str) -> str:
    """What ``program`` prints, run by this interpreter in a process of its own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and not (k.startswith("LOOPSCOPE_") and k != HOT_PATH)
    }
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def _work() -> None:
    """Short task steps, one slow step (over the 50 ms threshold), one executor call."""
    for _ in range(300):
        await asyncio.sleep(0)
    time.sleep(0.06)
    await asyncio.get_running_loop().run_in_executor(None, time.sleep, 0.001)


@pytest.fixture(name="readers")
def fixture_readers(registry: CollectorRegistry) -> Iterator[list[InMemoryMetricReader]]:
    """A cumulative and a delta reader on one provider, loopscope exporting to it."""
    delta = dict.fromkeys((Histogram, ObservableCounter), AggregationTemporality.DELTA)
    readers = [InMemoryMetricReader(), InMemoryMetricReader(preferred_temporality=delta)]
    provider = MeterProvider(metric_readers=readers)
    loopscope.install(registry=registry, otel=provider, slow_threshold=0.05)
    yield readers
    loopscope.uninstall()
    provider.shutdown()


class TestSameFiguresAsPrometheus:
    """Every collection shows what a scrape shows at that moment."""

    def test_histograms_and_counters(
        self, run: Run, registry: CollectorRegistry, readers: list[InMemoryMetricReader]
    ) -> None:
        """Bucket counts, counts and sums equal the Prometheus ones after each of two
        collections, for a cumulative reader and (added up) for a delta reader."""
        cumulative, delta = readers
        added: dict[str, list[int]] = {}
        for _ in range(2):
            run(_work)
            seen, gained = _points(cumulative), _points(delta)
            for name, family in LOOP_HISTOGRAMS.items():
                point = _main_loop(seen[name])
                assert list(point.explicit_bounds) == list(BUCKETS)
                wanted = _prometheus_buckets(registry, family)
                assert list(point.bucket_counts) == wanted, name
                assert point.count == sum(wanted)
                total = sample(registry, f"{family}_sum", loop="MainThread")
                assert point.sum == pytest.approx(total, rel=1e-9, abs=1e-12)
                step = _main_loop(gained[name]).bucket_counts
                added[name] = [
                    a + b for a, b in zip(added.get(name, [0] * len(step)), step, strict=True)
                ]
                assert added[name] == wanted, name
            for name, family in COUNTERS.items():
                point = _main_loop(seen[name])
                assert point.value == pytest.approx(sample(registry, family, loop="MainThread"))
        # Each _work() blocks once; a loaded machine can make another step slow too.
        slow = _main_loop(_points(cumulative)["loopscope.eventloop.slow_steps"])
        assert slow.value >= 2

    def test_executor_figures(
        self, run: Run, registry: CollectorRegistry, readers: list[InMemoryMetricReader]
    ) -> None:
        """Executor histograms and gauges carry the loop and executor attributes."""
        run(_work)
        seen = _points(readers[0])
        keys = {"loopscope.loop.name": "MainThread", "loopscope.executor.name": "default"}
        (ran,) = seen["loopscope.executor.run.duration"]
        assert dict(ran.attributes) == keys
        labels = {"loop": "MainThread", "executor": "default"}
        ran_count = sample(registry, "asyncio_executor_run_duration_seconds_count", **labels)
        assert ran.count == ran_count
        (most,) = seen["loopscope.executor.workers.max"]
        assert most.value == sample(registry, "asyncio_executor_workers_max", **labels)


class TestCost:
    """Handing histograms over costs per bucket, not per step."""

    def test_one_record_per_bucket(
        self, run: Run, readers: list[InMemoryMetricReader], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Thousands of steps reach the SDK through at most one record() per bucket."""
        calls = []
        original = _Histogram.record

        def counting(self: Any, *args: Any, **kwargs: Any) -> None:
            calls.append(self.name)
            original(self, *args, **kwargs)

        monkeypatch.setattr(_Histogram, "record", counting)
        run(_work)
        run(_work)
        point = _main_loop(_points(readers[0])["loopscope.eventloop.callback.duration"])
        assert point.count > 600
        assert 0 < calls.count("loopscope.eventloop.callback.duration") <= len(BUCKETS) + 1


class TestLifeCycle:
    """The export is started by the option or the instrumentor and stops with them."""

    def test_uninstall_stops_reporting(self, run: Run, readers: list[InMemoryMetricReader]) -> None:
        """After uninstall() no counter is reported and histograms no longer move."""
        run(_work)
        before = _main_loop(_points(readers[0])["loopscope.eventloop.callback.duration"])
        loopscope.uninstall()
        run(_work)
        after = _points(readers[0])
        assert "loopscope.eventloop.task.steps" not in after
        assert _main_loop(after["loopscope.eventloop.callback.duration"]).count == before.count

    def test_installed_again_on_the_same_provider(self, run: Run) -> None:
        """A later installation on the same provider reports through the instruments the
        first one made: its own figures, from its own start."""
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        handed = 0  # callback steps handed to the cumulative histogram so far
        for _ in range(2):
            registry = CollectorRegistry()
            loopscope.install(registry=registry, otel=provider)
            run(_work)
            seen = _points(reader)
            steps = _main_loop(seen["loopscope.eventloop.task.steps"]).value
            assert steps == sample(registry, "asyncio_loop_task_steps_total", loop="MainThread")
            name = "loopscope.eventloop.callback.duration"
            count = sample(registry, f"{LOOP_HISTOGRAMS[name]}_count", loop="MainThread")
            assert _main_loop(seen[name]).count == handed + count
            handed += count
            loopscope.uninstall()
        provider.shutdown()

    def test_installed_again_once_the_global_provider_is_set(self) -> None:
        """Instruments made on the API's proxy before the SDK was set as the global provider
        are the SDK provider's: an installation after that reports through them."""
        program = textwrap.dedent(
            """
            import asyncio

            from opentelemetry import metrics
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            import loopscope

            loopscope.install(otel=True)
            loopscope.uninstall()
            reader = InMemoryMetricReader()
            metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
            loopscope.install(otel=True)

            async def main():
                for _ in range(100):
                    await asyncio.sleep(0)

            asyncio.run(main())
            data = reader.get_metrics_data()
            for scope_metrics in data.resource_metrics[0].scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == "loopscope.eventloop.task.steps":
                        print(metric.data.data_points[0].value)
            """
        )
        assert int(_python(program)) >= 100

    def test_instrumentor(self, run: Run, registry: CollectorRegistry) -> None:
        """LoopscopeInstrumentor installs loopscope with the export and uninstrument()
        uninstalls it; on a running installation it adds, then removes, the export only."""
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        instrumentor = LoopscopeInstrumentor()
        instrumentor.instrument(meter_provider=provider)
        try:
            run(_work)
            assert _main_loop(_points(reader)["loopscope.eventloop.task.steps"]).value > 300
        finally:
            instrumentor.uninstrument()
        assert loopscope._installation.current() is None

        installation = loopscope.install(registry=registry)
        instrumentor.instrument(meter_provider=provider)
        assert installation.otel is not None
        instrumentor.uninstrument()
        assert loopscope._installation.current() is installation
        assert installation.otel is None

    def test_a_broken_provider_is_reported_not_raised(
        self, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A provider that fails is logged once; loopscope is installed all the same."""

        class Broken:
            def get_meter(self, *args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("no meter today")

        with caplog.at_level(logging.ERROR, logger="loopscope"):
            installation = loopscope.install(registry=registry, otel=Broken())
        assert installation.otel is None
        assert [r.getMessage() for r in caplog.records if r.name == "loopscope"] == [
            "loopscope: error while starting the OpenTelemetry export; that measurement is "
            "switched off and the application goes on"
        ]


class TestOtherProviders:
    """A provider whose histograms are not the SDK's still gets counters and gauges."""

    def test_histograms_not_from_the_sdk(
        self, run: Run, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Histograms it cannot hand buckets to are reported once and left out; the
        counters go on."""
        reader = InMemoryMetricReader()
        sdk = MeterProvider(metric_readers=[reader])

        class Plain:
            def record(self, *args: Any, **kwargs: Any) -> None:
                raise AssertionError("no value should be recorded one by one")

        class Meter:
            def __init__(self, meter: Any) -> None:
                self.meter = meter

            def __getattr__(self, name: str) -> Any:
                return getattr(self.meter, name)

            def create_histogram(self, *args: Any, **kwargs: Any) -> Plain:
                return Plain()

        class Provider:
            def get_meter(self, *args: Any, **kwargs: Any) -> Meter:
                return Meter(sdk.get_meter(*args, **kwargs))

        loopscope.install(registry=registry, otel=Provider())
        with caplog.at_level(logging.ERROR, logger="loopscope"):
            for _ in range(2):
                run(_work)
                steps = _main_loop(_points(reader)["loopscope.eventloop.task.steps"])
                wanted = sample(registry, "asyncio_loop_task_steps_total", loop="MainThread")
                assert steps.value == wanted
        assert [r.getMessage() for r in caplog.records if r.name == "loopscope"] == [
            "loopscope: error while handing histograms to OpenTelemetry; that measurement "
            "is switched off and the application goes on"
        ]
        sdk.shutdown()

    def test_a_view_with_other_buckets(
        self, run: Run, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A View that gives a histogram other boundaries turns the histograms off, logged
        once; the counters go on."""
        reader = InMemoryMetricReader()
        view = View(
            instrument_name="loopscope.eventloop.delay",
            aggregation=ExplicitBucketHistogramAggregation((0.5, 1.0)),
        )
        provider = MeterProvider(metric_readers=[reader], views=[view])
        loopscope.install(registry=registry, otel=provider)
        with caplog.at_level(logging.ERROR, logger="loopscope"):
            for _ in range(2):
                run(_work)
                steps = _main_loop(_points(reader)["loopscope.eventloop.task.steps"])
                wanted = sample(registry, "asyncio_loop_task_steps_total", loop="MainThread")
                assert steps.value == wanted
        messages = [r.getMessage() for r in caplog.records if r.name == "loopscope"]
        assert messages == [
            "loopscope: error while handing histograms to OpenTelemetry; that measurement "
            "is switched off and the application goes on"
        ]
        assert "another aggregation or other bucket boundaries" in str(caplog.records[0].exc_info)
        provider.shutdown()


class TestDocs:
    """docs/opentelemetry.md's table is the table of instruments."""

    def test_table(self) -> None:
        """Every row: name, instrument, unit, attributes and Prometheus name as made."""
        kinds = {
            "histogram": "Histogram",
            "counter": "ObservableCounter",
            "updowncounter": "ObservableUpDownCounter",
            "gauge": "ObservableGauge",
        }
        rows = [
            [cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in (ROOT / "docs" / "opentelemetry.md").read_text().splitlines()
            if line.startswith("| `")
        ]
        made = [
            [
                f"`{spec.name}`",
                kinds[spec.kind],
                f"`{spec.unit}`",
                ", ".join(f"`{key}`" for key in spec.attributes),
                f"`{spec.prometheus}`",
            ]
            for spec in INSTRUMENTS
        ]
        assert rows == made


class TestOption:
    """The option and its variable."""

    @pytest.mark.parametrize(
        ("text", "value"), [("1", True), (" Yes ", True), ("on", True), ("off", False)]
    )
    def test_variable_words(self, text: str, value: bool) -> None:
        """LOOPSCOPE_OTEL takes the usual words for true and false."""
        assert resolve_options({}, {"LOOPSCOPE_OTEL": text}).otel is value

    def test_not_needed_at_import(self) -> None:
        """With every opentelemetry module unimportable, loopscope imports and installs;
        asking for otel is a ConfigError that says which extra to install."""
        program = textwrap.dedent(
            """
            import sys

            class Block:
                def find_spec(self, name, path=None, target=None):
                    if name == "opentelemetry" or name.startswith("opentelemetry."):
                        raise ImportError("blocked: " + name)

            sys.meta_path.insert(0, Block())
            import loopscope

            loopscope.uninstall()
            loopscope.install()
            loopscope.uninstall()
            try:
                loopscope.install(otel=True)
            except loopscope.ConfigError as exc:
                print(exc)
            assert not [m for m in sys.modules if m.startswith("opentelemetry")]
            """
        )
        assert "pip install 'loopscope[otel]'" in _python(program)
