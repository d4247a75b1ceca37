"""A bare ASGI app for the uvicorn tests: ``/block`` blocks the loop for 150 ms."""

from __future__ import annotations

import time
from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer 200; block first when the path is /block."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/block":
        time.sleep(0.15)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
