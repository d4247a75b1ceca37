"""The HTTP service of workload 3: aiohttp on uvloop, with loopscope installed or not.

``python -m benchmarks.http_server PORT {none,loopscope}``; prints ``READY <port>`` when
listening.  PORT 0 takes a port the system chooses (the one ``READY`` names), so a caller
never has to find a free port and hope nothing takes it before the server binds it.
With ``BENCH_TRACE=1`` in its environment, every request runs in an OpenTelemetry span.

``python -m benchmarks.http_server PORT alternate`` serves uninstrumented first and then
reads ``none`` or ``loopscope`` lines on its standard input: each installs or uninstalls
loopscope from inside the running loop (which instruments or restores that loop), opens a
new site on the same port (so every connection after the switch gets the protocol of the
variant now in force), closes the old one and prints ``READY <port>`` again.  Both sites
set SO_REUSEPORT, so the new one listens before the old one closes and the port is never
free for another process to take.  Both variants are then measured in one process, whose
memory layout no longer tells them apart.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import uvloop
from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    await asyncio.sleep(0)  # one extra task step per request, like a handler that awaits
    return web.Response(text="hello, world\n")


def traced(handler: Any) -> Any:
    """``handler`` in a span of the OpenTelemetry SDK per request."""
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("benchmarks")

    async def in_span(request: web.Request) -> web.Response:
        with tracer.start_as_current_span("GET /"):
            return await handler(request)  # type: ignore[no-any-return]

    return in_span


def install() -> None:
    from prometheus_client import CollectorRegistry

    import loopscope

    loopscope.install(registry=CollectorRegistry())


async def open_site(runner: web.AppRunner, port: int) -> tuple[web.TCPSite, int]:
    """A started site on ``port`` (0: any free one) and the port it listens on."""
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024, reuse_port=True)
    await site.start()
    bound = int(runner.addresses[0][1])  # every site of the runner listens on one port
    return site, bound


async def serve(port: int, alternate: bool) -> None:
    app = web.Application()
    # BENCH_TRACE=1: every request in a span (the OpenTelemetry SDK's).
    app.router.add_get("/", traced(hello) if os.environ.get("BENCH_TRACE") == "1" else hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site, port = await open_site(runner, port)
    print(f"READY {port}", flush=True)
    if not alternate:
        await asyncio.Event().wait()
    import loopscope

    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        variant = line.strip()
        if not variant:
            return  # standard input closed: the benchmark is done
        if variant == "loopscope":
            install()
        else:
            loopscope.uninstall()
        old = site
        site, _ = await open_site(runner, port)
        await old.stop()
        print(f"READY {port}", flush=True)


def main() -> None:
    port, mode = int(sys.argv[1]), sys.argv[2]
    if mode == "loopscope":
        install()
    uvloop.run(serve(port, alternate=mode == "alternate"))


if __name__ == "__main__":
    main()
