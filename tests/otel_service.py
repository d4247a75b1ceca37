"""A small instrumented service for the OpenTelemetry export tests.

``python tests/otel_service.py asyncio|uvloop code ENDPOINT``: installs loopscope with
``otel=True``, then sets up the OpenTelemetry SDK as the global provider with its OTLP/HTTP
metric exporter (an export every 100 ms) pointed at ENDPOINT, runs the work below and
shuts the SDK down, which exports once more.  ``... zero-code``: only the work;
``opentelemetry-instrument`` is expected to have set up everything (configured by
``OTEL_*`` variables).

The work lasts about a second: many short task steps, one step that blocks the loop for
60 ms (over the 50 ms slow threshold), and calls in a thread pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import time


async def work() -> None:
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pool") as pool:
        for round_ in range(10):
            for _ in range(200):
                await asyncio.sleep(0)
            if round_ == 3:
                time.sleep(0.06)  # the slow step
            await loop.run_in_executor(pool, time.sleep, 0.001)
            await asyncio.sleep(0.1)


def main() -> None:
    kind, mode = sys.argv[1], sys.argv[2]
    provider = None
    if mode == "code":
        # loopscope first, the SDK second: its instruments are made on the API's proxy
        # provider and must report once the SDK's provider is set.
        import loopscope

        loopscope.install(otel=True, slow_threshold=0.05)

        from opentelemetry import metrics
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource

        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=sys.argv[3]), export_interval_millis=100
        )
        provider = MeterProvider(
            metric_readers=[reader], resource=Resource({"service.name": f"code-{kind}"})
        )
        metrics.set_meter_provider(provider)
    if kind == "uvloop":
        import uvloop

        uvloop.run(work())
    else:
        asyncio.run(work())
    if provider is not None:
        provider.shutdown()


if __name__ == "__main__":
    main()
