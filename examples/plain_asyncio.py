"""A plain asyncio (or uvloop) program: install() first, then run the loop as usual.

    python -m examples.plain_asyncio --loop asyncio        # or --loop uvloop
    python -m examples.plain_asyncio --loop uvloop --port 9100 --seconds 60

It runs a mix of work for ``--seconds`` (one blocking step, executor offload, a TaskGroup)
and prints the main figures it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import time

from prometheus_client import CollectorRegistry

import loopscope


async def work(seconds: float) -> None:
    """Some async work, one blocking call and some offloaded calls."""
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="files")
    deadline = loop.time() + seconds
    time.sleep(0.15)  # a blocking call: one slow step
    while True:
        await asyncio.gather(
            asyncio.to_thread(time.sleep, 0.01),
            *(loop.run_in_executor(pool, time.sleep, 0.02) for _ in range(3)),
            *(asyncio.sleep(0.001) for _ in range(10)),
        )
        if loop.time() >= deadline:
            break
    pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=None, help="also serve /metrics")
    options = parser.parse_args()
    registry = CollectorRegistry()
    loopscope.install(registry=registry, port=options.port)
    if options.loop == "uvloop":
        import uvloop

        uvloop.run(work(options.seconds))
    else:
        asyncio.run(work(options.seconds))
    main_loop = {"loop": "MainThread"}
    for name, labels in [
        ("asyncio_loop_slow_callbacks_total", main_loop),
        ("asyncio_loop_task_steps_total", main_loop),
        ("asyncio_executor_run_duration_seconds_count", {**main_loop, "executor": "default"}),
        ("asyncio_executor_run_duration_seconds_count", {**main_loop, "executor": "files"}),
    ]:
        value = registry.get_sample_value(name, labels) or 0.0
        shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
        print(f"{name}{{{shown}}} {value:g}")
    loopscope.uninstall()


if __name__ == "__main__":
    main()
