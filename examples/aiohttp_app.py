"""aiohttp, instrumented from on_startup, with a /metrics route.

    python -m examples.aiohttp_app --port 8080            # --loop uvloop for uvloop
    gunicorn 'examples.aiohttp_app:make_app()' -k aiohttp.worker.GunicornWebWorker -w 4 \\
        --env LOOPSCOPE_MULTIPROCESS_DIR=/run/loopscope        # uvloop: GunicornUVLoopWebWorker

With ``LOOPSCOPE_MULTIPROCESS_DIR`` set, the /metrics route of any worker answers with the
totals of all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from aiohttp import web

import loopscope

BLOCK_SECONDS = 0.3


async def on_startup(app: web.Application) -> None:
    """Runs inside the server's loop: install() instruments it right away."""
    loopscope.install()


async def index(request: web.Request) -> web.Response:
    """Answers at once."""
    return web.Response(text=f"pid={os.getpid()}")


async def block(request: web.Request) -> web.Response:
    """Blocks the event loop: a slow step."""
    time.sleep(BLOCK_SECONDS)
    return web.Response(text=f"pid={os.getpid()}")


async def offload(request: web.Request) -> web.Response:
    """The same work in the default executor."""
    await asyncio.to_thread(time.sleep, BLOCK_SECONDS)
    return web.Response(text=f"pid={os.getpid()}")


def make_app() -> web.Application:
    """The application (also gunicorn's entry point: ``examples.aiohttp_app:make_app``)."""
    app = web.Application()
    app.on_startup.append(on_startup)
    app.router.add_get("/", index)
    app.router.add_get("/block", block)
    app.router.add_get("/offload", offload)
    app.router.add_get("/metrics", loopscope.aiohttp_metrics_handler())
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    options = parser.parse_args()
    if options.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    web.run_app(make_app(), host=options.host, port=options.port, print=None, loop=loop)
