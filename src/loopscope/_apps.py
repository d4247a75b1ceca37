"""/metrics inside the application: an ASGI app and an aiohttp handler serving a registry
(by default the active installation's, else prometheus_client's).

Both negotiate the form of the answer as prometheus_client's own server does (see
``_negotiation``), and neither builds the exposition on the loop that serves the request:
that loop is the one being measured, and a build holds it for about a millisecond with one
loop label, tens of milliseconds with a hundred.  The build runs on one thread of
loopscope's own (``loopscope-exposition``), submitted to directly rather than through
``loop.run_in_executor``: the application's default executor may be busy with the
application's own blocking calls (a scrape would queue behind them), and loopscope measures
the work a loop hands to executors, which a scrape is not.  One thread, because builds are
serialised by the registry's lock anyway, and scrapes within ``REUSE_SECONDS`` of a build
get that build again.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.registry import REGISTRY, CollectorRegistry

from ._installation import current
from ._log import logger
from ._negotiation import KeptExposition, Wanted, wanted

__all__ = ["MetricsASGIApp", "aiohttp_metrics_handler", "metrics_asgi_app"]

#: As the endpoint (``_server.REUSE_SECONDS``): scrapes within this many seconds of a build
#: get that build.
REUSE_SECONDS = 0.25

_builder_lock = threading.Lock()
_builder: tuple[int, ThreadPoolExecutor] | None = None


def _build_thread() -> ThreadPoolExecutor:
    """The one thread that builds expositions for the helpers, made on first use (and again
    in a forked child, where the parent's thread does not exist)."""
    global _builder
    with _builder_lock:
        pid = os.getpid()
        if _builder is None or _builder[0] != pid:
            _builder = (
                pid,
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="loopscope-exposition"),
            )
        return _builder[1]


class _Exporter:
    """The kept exposition of one registry, built off the loop."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry
        self.kept: KeptExposition | None = None
        self.failed = False

    def _kept(self) -> KeptExposition:
        registry = self.registry if self.registry is not None else _default_registry()
        kept = self.kept
        if kept is None or kept.registry is not registry:
            kept = self.kept = KeptExposition(registry, REUSE_SECONDS)
        return kept

    async def answer(
        self, accept: str | None, accept_encoding: str | None, query: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers and body for a request with these headers and query."""
        try:
            form: Wanted = wanted(accept, accept_encoding, query)
        except (TypeError, ValueError):  # prometheus_client's parse of a version failed
            return 400, [("Content-Type", "text/plain; charset=utf-8")], b"unreadable Accept\n"
        kept = self._kept()
        try:
            body = await asyncio.wrap_future(_build_thread().submit(kept.body, form))
        except Exception as exc:
            if not self.failed:
                self.failed = True
                logger().error(
                    "loopscope: building the /metrics exposition failed; answering 500 "
                    "(logged once)",
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
            return (
                500,
                [("Content-Type", "text/plain; charset=utf-8")],
                b"the metrics could not be collected\n",
            )
        headers = [("Content-Type", form.content_type)]
        if form.gzip:
            headers.append(("Content-Encoding", "gzip"))
        return 200, headers, body


class MetricsASGIApp:
    """The ASGI app :func:`metrics_asgi_app` returns.  An object rather than a function:
    Starlette's ``Route`` takes a plain function for a request handler, and any other
    callable for an ASGI app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.exporter = _Exporter(registry)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            return
        headers: dict[str, list[str]] = {}
        for name, value in scope.get("headers") or ():
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        accept = headers.get("accept")
        accept_encoding = headers.get("accept-encoding")
        status, answer_headers, body = await self.exporter.answer(
            ",".join(accept) if accept is not None else None,
            ",".join(accept_encoding) if accept_encoding is not None else None,
            scope.get("query_string", b"").decode("latin-1"),
        )
        message = await receive()
        if message.get("type") != "http.request":
            return  # the client went away
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer_headers
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def metrics_asgi_app(registry: CollectorRegistry | None = None) -> MetricsASGIApp:
    """An ASGI app serving the registry (default: loopscope's, else prometheus_client's).

    In Starlette or FastAPI, ``app.add_route("/metrics", loopscope.metrics_asgi_app())``
    answers ``/metrics`` itself; ``app.mount("/metrics", ...)`` works too, but Starlette then
    redirects ``/metrics`` to ``/metrics/``."""
    return MetricsASGIApp(registry)


def aiohttp_metrics_handler(
    registry: CollectorRegistry | None = None,
) -> Callable[[Any], Awaitable[Any]]:
    """An aiohttp request handler serving the registry:
    ``app.router.add_get("/metrics", loopscope.aiohttp_metrics_handler())``."""
    from aiohttp import web

    exporter = _Exporter(registry)

    async def handler(request: web.Request) -> web.Response:
        accept = request.headers.getall("Accept", None)
        accept_encoding = request.headers.getall("Accept-Encoding", None)
        status, headers, body = await exporter.answer(
            ",".join(accept) if accept is not None else None,
            ",".join(accept_encoding) if accept_encoding is not None else None,
            request.rel_url.raw_query_string,
        )
        return web.Response(status=status, body=body, headers=dict(headers))

    return handler


def _default_registry() -> CollectorRegistry:
    inst = current()
    return inst.options.registry if inst is not None else REGISTRY
