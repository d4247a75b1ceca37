"""A bare ASGI app with no loopscope code at all, for ``loopscope run``.

    loopscope run --port 9100 -- uvicorn examples.zero_code_asgi:app --workers 4
    loopscope run --port 9100 -- gunicorn -c examples/gunicorn.conf.py examples.zero_code_asgi:app

``/block`` blocks the loop for 0.3 s (as a synchronous client or a big computation would);
``/offload`` does the same work in the default executor; every answer names the worker's
process id.  The figures of every worker, merged, are on http://127.0.0.1:9100/metrics.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

BLOCK_SECONDS = 0.3


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer ``pid=<pid>``; block or offload first when the path says so."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/block":
        time.sleep(BLOCK_SECONDS)
    elif scope["path"] == "/offload":
        await asyncio.to_thread(time.sleep, BLOCK_SECONDS)
    body = f"pid={os.getpid()}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
