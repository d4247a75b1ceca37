"""The HTTP service of workload 3: aiohttp on uvloop, with loopscope installed or not.

``python -m benchmarks.http_server PORT {none,loopscope}``; prints READY when listening.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    await asyncio.sleep(0)  # one extra task step per request, like a handler that awaits
    return web.Response(text="hello, world\n")


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    print("READY", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    port = int(sys.argv[1])
    if sys.argv[2] == "loopscope":
        from prometheus_client import CollectorRegistry

        import loopscope

        loopscope.install(registry=CollectorRegistry())
    uvloop.run(serve(port))


if __name__ == "__main__":
    main()
