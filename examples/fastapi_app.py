"""FastAPI on uvicorn, instrumented from the lifespan, with a /metrics route in the app.

    uvicorn examples.fastapi_app:app --port 8000          # then GET /block, /offload, /metrics
    uvicorn examples.fastapi_app:app --port 8000 --loop uvloop

Under several workers (``uvicorn --workers 4``, or gunicorn with ``gunicorn.conf.py``),
set ``LOOPSCOPE_MULTIPROCESS_DIR`` to a shared directory and every worker's ``/metrics``
answers with the totals of all of them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import loopscope

BLOCK_SECONDS = 0.3


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Install loopscope inside uvicorn's loop (the running loop is instrumented at once)."""
    loopscope.install()
    yield
    loopscope.uninstall()


app = FastAPI(lifespan=lifespan)
# A route rather than a mount: it answers GET and HEAD /metrics itself, where
# app.mount("/metrics", ...) would answer with a redirect to /metrics/.
app.add_route("/metrics", loopscope.metrics_asgi_app(), methods=["GET"])


@app.get("/block")
async def block() -> dict[str, int]:
    """Blocks the event loop: a slow step."""
    time.sleep(BLOCK_SECONDS)
    return {"pid": os.getpid()}


@app.get("/offload")
async def offload() -> dict[str, int]:
    """The same work in the default executor: the loop stays free."""
    await asyncio.to_thread(time.sleep, BLOCK_SECONDS)
    return {"pid": os.getpid()}
