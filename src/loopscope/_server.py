"""The /metrics endpoint: a small HTTP server on its own thread, so that a scrape is answered
while the loop is blocked; plus helpers that mount /metrics into an ASGI or aiohttp app.

The endpoint serves nothing but the exposition: ``GET``/``HEAD`` on ``/metrics`` (and ``/``).
It binds 127.0.0.1 unless told otherwise, can serve HTTPS (``tls_certfile``/``tls_keyfile``),
require client certificates (``tls_client_cafile``) and HTTP basic authentication
(``basic_auth_username``/``basic_auth_password``).  The TLS handshake runs in the
connection's own thread with a timeout, so a client that never completes it holds up
nobody else.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import REGISTRY, CollectorRegistry

if TYPE_CHECKING:
    from ._options import Options

__all__ = ["MetricsServer", "aiohttp_metrics_handler", "metrics_asgi_app"]

METRICS_PATHS = frozenset({"/metrics", "/"})
#: Seconds a connection may stay silent (TLS handshake included) before it is dropped.
CONNECTION_TIMEOUT = 10.0
#: Scrapes within this many seconds of the last exposition built get that one again.
REUSE_SECONDS = 0.05
_TEXT = ("Content-Type", "text/plain; charset=utf-8")
_fallback = logging.getLogger("loopscope")


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = False
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Runs in the connection's thread: the TLS handshake happens here, not in accept()."""
        request.settimeout(CONNECTION_TIMEOUT)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        wrapped = self.tls.wrap_socket(request, server_side=True)
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A broken connection or failed handshake concerns that scraper only: not printed."""
        _fallback.debug(
            "loopscope: /metrics connection from %s failed", client_address, exc_info=True
        )


class _QuietHandler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def _credentials(username: str, password: str) -> bytes:
    return f"{username}:{password}".encode()


def _authorized(header: str, expected: bytes) -> bool:
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, expected)


def _metrics_wsgi(
    registry: CollectorRegistry, credentials: bytes | None = None
) -> Callable[..., Iterable[bytes]]:
    failures: list[int] = []
    building = threading.Lock()
    latest: list[Any] = [float("-inf"), b""]  # when the last exposition was built, and it

    def exposition() -> bytes:
        # One build at a time; scrapes arriving while one is built, or within
        # REUSE_SECONDS of it, get that build.  Building costs CPU under the GIL, so
        # a burst of scrapes must not take the loop's time; a failed build is not reused.
        with building:
            if time.monotonic() - latest[0] < REUSE_SECONDS:
                body: bytes = latest[1]
                return body
            body = generate_latest(registry)
            latest[0], latest[1] = time.monotonic(), body
            return body

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        # Authentication first: an unauthenticated client learns nothing, not even the paths.
        if credentials is not None and not _authorized(
            environ.get("HTTP_AUTHORIZATION", ""), credentials
        ):
            start_response(
                "401 Unauthorized",
                [_TEXT, ("WWW-Authenticate", 'Basic realm="loopscope", charset="UTF-8"')],
            )
            return [b"authentication required\n"]
        if path not in METRICS_PATHS:
            start_response("404 Not Found", [_TEXT])
            return [b"loopscope serves only /metrics\n"]
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [_TEXT, ("Allow", "GET, HEAD")])
            return [b"only GET and HEAD are allowed on /metrics\n"]
        try:
            output = exposition()
        except Exception as exc:
            # A collector of the registry (loopscope's or another) raised: this scrape fails
            # with 500, the server thread and the application go on.
            if not failures:
                _fallback.error(
                    "loopscope: building the /metrics exposition failed; answering 500 "
                    "(logged once)",
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
            failures.append(1)
            del failures[1:]
            start_response("500 Internal Server Error", [_TEXT])
            return [b"the metrics could not be collected\n"]
        start_response(
            "200 OK",
            [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(output)))],
        )
        return [b"" if method == "HEAD" else output]

    return app


def _server_class(addr: str) -> type[_ThreadingServer]:
    """A server class of the address family of ``addr``: an IPv6 literal (``::1``, ``::``)
    binds IPv6; anything else (an IPv4 address or a host name) binds IPv4 as before."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    class Server(_ThreadingServer):
        address_family = family

    return Server


class MetricsServer:
    """Serves the registry over HTTP(S) from a daemon thread."""

    def __init__(
        self,
        addr: str,
        port: int,
        registry: CollectorRegistry,
        options: Options | None = None,
    ) -> None:
        tls: ssl.SSLContext | None = None
        credentials: bytes | None = None
        if options is not None:
            if options.tls_certfile is not None:
                from ._options import ConfigError, tls_context

                try:
                    tls = tls_context(options)
                except ConfigError as exc:  # the files changed since validation
                    raise OSError(str(exc)) from None
            if options.basic_auth_username is not None and options.basic_auth_password is not None:
                credentials = _credentials(options.basic_auth_username, options.basic_auth_password)
        self.httpd = make_server(
            addr,
            port,
            _metrics_wsgi(registry, credentials),
            server_class=_server_class(addr),
            handler_class=_QuietHandler,
        )
        assert isinstance(self.httpd, _ThreadingServer)
        self.httpd.tls = tls
        self.port: int = self.httpd.server_port
        self.addr = addr
        self.scheme = "https" if tls is not None else "http"
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
