"""/metrics inside the application: an ASGI app and an aiohttp handler serving a registry
(by default the active installation's, else prometheus_client's)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import REGISTRY, CollectorRegistry

from ._installation import current

__all__ = ["MetricsASGIApp", "aiohttp_metrics_handler", "metrics_asgi_app"]


class MetricsASGIApp:
    """The ASGI app :func:`metrics_asgi_app` returns.  An object rather than a function:
    Starlette's ``Route`` takes a plain function for a request handler, and any other
    callable for an ASGI app."""

    def __init__(self, serve: Callable[..., Awaitable[None]]) -> None:
        self.serve = serve

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.serve(scope, receive, send)


def metrics_asgi_app(registry: CollectorRegistry | None = None) -> MetricsASGIApp:
    """An ASGI app serving the registry (default: loopscope's, else prometheus_client's).

    In Starlette or FastAPI, ``app.add_route("/metrics", loopscope.metrics_asgi_app())``
    answers ``/metrics`` itself; ``app.mount("/metrics", ...)`` works too, but Starlette then
    redirects ``/metrics`` to ``/metrics/``."""
    from prometheus_client import make_asgi_app

    return MetricsASGIApp(make_asgi_app(registry if registry is not None else _default_registry()))


def aiohttp_metrics_handler(
    registry: CollectorRegistry | None = None,
) -> Callable[[Any], Awaitable[Any]]:
    """An aiohttp request handler serving the registry:
    ``app.router.add_get("/metrics", loopscope.aiohttp_metrics_handler())``."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        output = generate_latest(registry if registry is not None else _default_registry())
        return web.Response(body=output, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler


def _default_registry() -> CollectorRegistry:
    inst = current()
    return inst.options.registry if inst is not None else REGISTRY
