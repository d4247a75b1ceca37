"""examples/zero_code_asgi.py's app, with ``loopscope.install()`` called at start-up, for
servers started without ``loopscope run`` (configured by ``LOOPSCOPE_*`` variables)."""

from __future__ import annotations

from typing import Any

from examples.zero_code_asgi import app as plain_app

import loopscope


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Install loopscope in the worker's running loop at start-up, then serve as the example."""
    if scope["type"] == "lifespan":
        loopscope.install()
    await plain_app(scope, receive, send)
