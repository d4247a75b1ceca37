"""The /metrics endpoint: a small HTTP server on its own thread, so that a scrape is answered
while the loop is blocked; plus helpers that mount /metrics into an ASGI or aiohttp app."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import REGISTRY, CollectorRegistry

__all__ = ["MetricsServer", "aiohttp_metrics_handler", "metrics_asgi_app"]

METRICS_PATHS = frozenset({"/metrics", "/"})


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = False


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def _metrics_wsgi(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path not in METRICS_PATHS:
            body = b"loopscope serves only /metrics\n"
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [body]
        if method not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed",
                [("Content-Type", "text/plain; charset=utf-8"), ("Allow", "GET, HEAD")],
            )
            return [b"only GET and HEAD are allowed on /metrics\n"]
        output = generate_latest(registry)
        start_response(
            "200 OK",
            [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(output)))],
        )
        return [b"" if method == "HEAD" else output]

    return app


class MetricsServer:
    """Serves the registry over HTTP from a daemon thread."""

    def __init__(self, addr: str, port: int, registry: CollectorRegistry) -> None:
        self.httpd = make_server(
            addr,
            port,
            _metrics_wsgi(registry),
            server_class=_ThreadingServer,
            handler_class=_QuietHandler,
        )
        self.port: int = self.httpd.server_port
        self.addr = addr
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="loopscope-metrics", daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        """Stop serving and free the port."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def metrics_asgi_app(registry: CollectorRegistry | None = None) -> Any:
    """An ASGI app serving the registry (default: loopscope's, else prometheus_client's),
    to mount at ``/metrics`` in Starlette or FastAPI: ``app.mount("/metrics", ...)``."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(registry if registry is not None else _default_registry())


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
    from ._installation import current

    inst = current()
    return inst.options.registry if inst is not None else REGISTRY
