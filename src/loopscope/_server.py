"""The /metrics endpoint: a small HTTP server on its own thread, so that a scrape is answered
while the loop is blocked.  (The helpers that mount /metrics into an ASGI or aiohttp app are
in ``_apps``.)

The endpoint serves the exposition, ``GET``/``HEAD`` on ``/metrics`` (and ``/``), and, when
given a source of events, the most recent events as JSON on ``EVENTS_PATH``.
It binds 127.0.0.1 unless told otherwise, can serve HTTPS (``tls_certfile``/``tls_keyfile``),
require client certificates (``tls_client_cafile``) and HTTP basic authentication
(``basic_auth_username``/``basic_auth_password``).

Every Python instruction the endpoint runs holds the GIL, which the busy loop then waits for,
and every blocking call it makes lets the loop run again and has to win the GIL back (up to
``sys.getswitchinterval()`` later, by interrupting the loop).  So the server is one thread
with one ``selectors`` loop over non-blocking sockets, not a thread per connection: a scrape
costs an accept, a receive, a send and a close, with a few lines of request parsing in
between, and the response (status line, headers and exposition) is kept as one ``bytes``
object for as long as the exposition is reused.  TLS handshakes are driven non-blocking by
the same loop, so a client that never completes one holds up nobody else; a connection that
has not sent its request within ``CONNECTION_TIMEOUT`` of being accepted, or that stalls for
that long while its answer is written, is dropped.

Without TLS, the socket work is done by the hot path's ``Engine``: the C twin's works with
the GIL released, taking it only to ask this module for an answer (``_Endpoint._respond``),
and a scrape whose request head is the same, byte for byte, as one answered with the
exposition within ``REUSE_SECONDS`` (and within the second of its ``Date`` header) gets the
same bytes from the engine without Python, so scrapes no longer interrupt a busy loop, only
the builds of the exposition do.  The pure twin's does the same in Python.  What is
answered to what stays decided here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import hmac
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from prometheus_client.registry import CollectorRegistry

from . import _hotpath
from ._log import logger
from ._negotiation import KeptExposition, Wanted, wanted
from ._options import ConfigError, tls_context

if TYPE_CHECKING:
    from ._options import Options

__all__ = ["MetricsServer"]

METRICS_PATHS = frozenset({"/metrics", "/"})
#: Where the recent events are served (``events_endpoint`` option); never cached.
EVENTS_PATH = "/loopscope/events"
#: Seconds a client has to send its request (TLS handshake included) once accepted, and
#: seconds a connection may stall while its answer is written, before it is dropped.
CONNECTION_TIMEOUT = 10.0
#: Scrapes within this many seconds of the last exposition built get that one again: at
#: most four builds a second however many scrapers there are (a build holds the GIL for
#: about a millisecond with one loop label, tens of milliseconds with a hundred), while one
#: Prometheus scraping every second or more slowly always gets a fresh one.
REUSE_SECONDS = 0.25
#: Largest request head (request line and headers) read; a longer one is answered 431.
MAX_REQUEST_HEAD = 16384
#: Connections open at once; further ones are closed as soon as they are accepted, so that
#: clients that connect and stay silent cannot use up the application's file descriptors.
MAX_CONNECTIONS = 256
#: Listen backlog: bursts of scrapers wait in the kernel rather than see a refused or
#: dropped connection (socketserver's default of 5 made a burst's clients retry after 1 s).
BACKLOG = 128
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
#: Plain connections stay in blocking mode and are read and written with this flag: one
#: ioctl (and one GIL hand-off) less per connection than setblocking(False).
_DONTWAIT: int = getattr(socket, "MSG_DONTWAIT", 0)


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


def _response(status: str, headers: list[tuple[str, str]], body: bytes, date: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Date: {date}", *(f"{k}: {v}" for k, v in headers)]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


class _Request:
    """The parts of a request head the endpoint looks at."""

    __slots__ = ("accept", "accept_encoding", "authorization", "method", "path", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        authorization: str | None,
        accept: str | None,
        accept_encoding: str | None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.authorization = authorization
        self.accept = accept
        self.accept_encoding = accept_encoding


def _parse(head: bytes) -> _Request | None:
    """The request line and the headers the endpoint reads of ``head`` (up to the blank
    line), or None when it is not an HTTP/1.x request.  An Authorization header sent more
    than once counts as none; an Accept or Accept-Encoding header sent more than once counts
    as their values joined with commas, as WSGI servers join them."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1]:
        return None
    method, target = parts[0], parts[1]
    raw_path, _, query = target.partition("?")
    path = unquote(raw_path, "latin-1")
    if path.startswith("//"):  # as http.server does: no scheme-relative paths
        path = "/" + path.lstrip("/")
    authorization: str | None = None
    seen = 0
    accept: list[str] = []
    accept_encoding: list[str] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        name = name.strip().lower()
        if name == "authorization":
            seen += 1
            authorization = value.strip()
        elif name == "accept":
            accept.append(value.strip())
        elif name == "accept-encoding":
            accept_encoding.append(value.strip())
    return _Request(
        method,
        path,
        query,
        authorization if seen == 1 else None,
        ",".join(accept) if accept else None,
        ",".join(accept_encoding) if accept_encoding else None,
    )


#: Forms of the exposition whose whole responses are kept at once; beyond that (a client
#: varying ``?name[]=``), answers are made and not kept.
_KEPT_FORMS = 32


class _Exposition:
    """The exposition (collected at most once per ``REUSE_SECONDS``, see
    :class:`KeptExposition`) and the whole ``200`` responses to GET and HEAD in each form
    asked for, rebuilt when the exposition or the second of the ``Date`` header changes.
    Used from the server thread only."""

    def __init__(
        self, registry: CollectorRegistry, before_build: Callable[[], None] | None = None
    ) -> None:
        self.kept = KeptExposition(registry, REUSE_SECONDS, before_build)
        self.second = -1
        self.date = ""
        #: Per form: (the body they hold, the second of their Date header, GET's, HEAD's).
        self.answers: dict[object, tuple[bytes, int, bytes, bytes]] = {}
        self.failures = 0
        #: Held while an exposition is built (the registry's own lock is taken meanwhile);
        #: the installation holds it across a fork (see MetricsServer.hold_builds).
        self.build_lock = self.kept.build_lock

    def now(self) -> str:
        """The ``Date`` header's value, formatted once a second."""
        second = int(time.time())
        if second != self.second:
            self.second, self.date = second, email.utils.formatdate(second, usegmt=True)
        return self.date

    def answer(self, head_only: bool, form: Wanted) -> bytes:
        """The ``200`` response in ``form``; raises what a collector raised."""
        body = self.kept.body(form)
        date = self.now()
        kept = self.answers.get(form.key)
        if kept is None or kept[0] is not body or kept[1] != self.second:
            headers = [("Content-Type", form.content_type)]
            if form.gzip:
                headers.append(("Content-Encoding", "gzip"))
            full = _response("200 OK", headers, body, date)
            kept = (body, self.second, full, full[: len(full) - len(body)])
            if len(self.answers) >= _KEPT_FORMS and form.key not in self.answers:
                self.answers = {k: v for k, v in self.answers.items() if v[1] == self.second}
            if len(self.answers) < _KEPT_FORMS:
                self.answers[form.key] = kept
        return kept[3] if head_only else kept[2]

    def fresh_for(self) -> float:
        """Seconds for which answer() will return what it last returned: until the
        exposition is due to be collected again or the ``Date`` header's second ends."""
        second_left = self.second + 1 - time.time()
        return max(0.0, min(self.kept.fresh_for(), second_left))


class _Connection:
    __slots__ = ("deadline", "flags", "handshaking", "inbox", "outbox", "sock", "watching")

    def __init__(self, sock: socket.socket, deadline: float, tls: bool) -> None:
        self.sock = sock
        self.deadline = deadline
        self.handshaking = tls
        self.flags = 0 if tls else _DONTWAIT  # a TLS socket is non-blocking and takes none
        self.inbox = b""
        self.outbox: memoryview | None = None
        self.watching = 0  # the selector events registered, 0 when not registered


class _Endpoint:
    """The listening socket and the thread that serves it.

    ``socket``, ``server_address`` and ``server_port`` are named as on ``socketserver``'s
    servers, which the endpoint used to be built on."""

    def __init__(
        self,
        addr: str,
        port: int,
        registry: CollectorRegistry,
        tls: ssl.SSLContext | None,
        credentials: bytes | None,
        before_build: Callable[[], None] | None = None,
        events: Callable[[], bytes] | None = None,
    ) -> None:
        # An IPv6 literal (``::1``, ``::``) binds IPv6; anything else (an IPv4 address or a
        # host name) binds IPv4.
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            if os.name == "posix":
                # A restarted service must bind again at once: the connections of its last
                # scrape may still be in TIME_WAIT.  (Two listeners on one port still fail:
                # that takes SO_REUSEPORT, which is never set.)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((addr, port))
            listener.listen(BACKLOG)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self.socket = listener
        self.server_address: tuple[Any, ...] = listener.getsockname()
        self.server_port: int = self.server_address[1]
        self.tls = tls
        self.credentials = credentials
        self.events = events
        self.exposition = _Exposition(registry, before_build)
        self.selector = selectors.DefaultSelector()
        self.connections: dict[socket.socket, _Connection] = {}
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        #: The engine doing the socket work (without TLS); None: the selector loop.
        self.engine: Any = None
        if tls is None:
            self.engine = _hotpath.twin.Engine(
                listener.fileno(),
                self._wake_r.fileno(),
                self._respond,
                CONNECTION_TIMEOUT,
                MAX_CONNECTIONS,
                MAX_REQUEST_HEAD,
            )

    # --- the thread ----------------------------------------------------------------------

    def serve_forever(self) -> None:
        if self.engine is not None:
            self._run_engine(self.engine)
            return
        try:
            while not self.stopping:
                timeout = None
                if self.connections:
                    earliest = min(c.deadline for c in self.connections.values())
                    timeout = max(0.0, earliest - time.monotonic())
                for key, _mask in self.selector.select(timeout):
                    if key.data is None:
                        self._accept()
                    elif isinstance(key.data, _Connection):
                        self._progress(key.data)
                    else:  # woken by shutdown(), here or in a forked child: drain
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                if self.connections:
                    now = time.monotonic()
                    for conn in [c for c in self.connections.values() if c.deadline <= now]:
                        self._close(conn)
        finally:
            for conn in list(self.connections.values()):
                self._close(conn)
            self.selector.close()
            self.socket.close()
            self._wake_r.close()

    def _run_engine(self, engine: Any) -> None:
        try:
            while not self.stopping:
                # Returns when woken (by shutdown(), here or in a forked child).
                engine.run()
        except Exception:
            logger().exception("loopscope: the /metrics endpoint stopped serving")
        finally:
            engine.close_all()
            self.selector.close()
            self.socket.close()
            self._wake_r.close()

    def shutdown(self) -> None:
        """Ask the thread to stop (it closes every socket on its way out)."""
        self.stopping = True
        if self.engine is not None:
            self.engine.stop()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def server_close(self) -> None:
        """Free the port, also where the thread is not running (a forked child) or is
        stuck (in a collector that never returns)."""
        self.socket.close()
        self._wake_w.close()

    # --- connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        # One connection per wake-up: a further one in the backlog keeps the listener
        # readable, and an accept() that finds nothing would be one more GIL hand-off.
        try:
            sock, _addr = self.socket.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            logger().debug("loopscope: accepting a /metrics connection failed", exc_info=True)
            return
        if len(self.connections) >= MAX_CONNECTIONS:
            sock.close()
            return
        try:
            if self.tls is not None or not _DONTWAIT:
                sock.setblocking(False)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            sock.close()
            return
        conn = _Connection(sock, time.monotonic() + CONNECTION_TIMEOUT, self.tls is not None)
        self.connections[sock] = conn
        # The request is usually there already: no round through select() for it.
        self._progress(conn)

    def _progress(self, conn: _Connection) -> None:
        """Move ``conn`` on as far as it goes without blocking."""
        try:
            if conn.handshaking:
                assert isinstance(conn.sock, ssl.SSLSocket)
                try:
                    conn.sock.do_handshake()
                except ssl.SSLWantReadError:
                    self._watch(conn, selectors.EVENT_READ)
                    return
                except ssl.SSLWantWriteError:
                    self._watch(conn, selectors.EVENT_WRITE)
                    return
                conn.handshaking = False
            if conn.outbox is None and not self._read(conn):
                return
            self._write(conn)
        except (OSError, ValueError):
            # A broken connection, a failed handshake or a refused client certificate
            # concerns that client only: not printed.
            logger().debug("loopscope: a /metrics connection failed", exc_info=True)
            self._close(conn)
        except Exception:
            # A fault of the endpoint itself: that connection is dropped, the server goes on.
            logger().exception("loopscope: answering a /metrics connection failed")
            self._close(conn)

    def _read(self, conn: _Connection) -> bool:
        """Read what has come; True once the answer is ready to be written."""
        sock = conn.sock
        while True:
            try:
                chunk = sock.recv(65536, conn.flags)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                self._watch(conn, selectors.EVENT_READ)
                return False
            except ssl.SSLWantWriteError:
                self._watch(conn, selectors.EVENT_WRITE)
                return False
            if not chunk:  # the client went away before its request was complete
                self._close(conn)
                return False
            conn.inbox += chunk
            end = conn.inbox.find(b"\r\n\r\n")
            if end >= 0:
                answer = self._answer(conn.inbox[:end])[0]
                break
            if len(conn.inbox) > MAX_REQUEST_HEAD:
                answer = self._error("431 Request Header Fields Too Large", "request too large")
                break
        conn.outbox = memoryview(answer)
        conn.inbox = b""
        conn.deadline = time.monotonic() + CONNECTION_TIMEOUT
        return True

    def _write(self, conn: _Connection) -> None:
        outbox = conn.outbox
        assert outbox is not None
        while outbox:
            try:
                sent = conn.sock.send(outbox, conn.flags)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                self._watch(conn, selectors.EVENT_WRITE)
                conn.outbox = outbox
                return
            except ssl.SSLWantReadError:
                self._watch(conn, selectors.EVENT_READ)
                conn.outbox = outbox
                return
            outbox = outbox[sent:]
            conn.deadline = time.monotonic() + CONNECTION_TIMEOUT
        self._close(conn)

    def _watch(self, conn: _Connection, events: int) -> None:
        if conn.watching == events:
            return
        if conn.watching:
            self.selector.modify(conn.sock, events, conn)
        else:
            self.selector.register(conn.sock, events, conn)
        conn.watching = events

    def _close(self, conn: _Connection) -> None:
        if self.connections.pop(conn.sock, None) is None:
            return
        if conn.watching:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()

    # --- answers -------------------------------------------------------------------------

    def _error(self, status: str, text: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
        body = text.encode() + b"\n"
        return _response(status, [("Content-Type", _TEXT), *headers], body, self.exposition.now())

    def _respond(self, head: bytes | None) -> tuple[bytes, float]:
        """The engine's question: the answer to a request head (None: longer than
        MAX_REQUEST_HEAD), and for how many seconds the same head may get the same bytes."""
        try:
            if head is None:
                return self._error("431 Request Header Fields Too Large", "request too large"), 0.0
            answer, exposition = self._answer(head)
            return answer, self.exposition.fresh_for() if exposition else 0.0
        except Exception:
            logger().exception("loopscope: answering a /metrics connection failed")
            return self._error(
                "500 Internal Server Error", "the request could not be answered"
            ), 0.0

    def _answer(self, head: bytes) -> tuple[bytes, bool]:
        """The answer to a request head, and whether it is the exposition (a 200)."""
        request = _parse(head)
        if request is None:
            return self._error("400 Bad Request", "not an HTTP/1.x request"), False
        # Authentication first: an unauthenticated client learns nothing, not even the paths.
        if self.credentials is not None and not (
            request.authorization is not None
            and _authorized(request.authorization, self.credentials)
        ):
            return self._error(
                "401 Unauthorized",
                "authentication required",
                (("WWW-Authenticate", 'Basic realm="loopscope", charset="UTF-8"'),),
            ), False
        if request.path == EVENTS_PATH and self.events is not None:
            return self._events(request.method, self.events), False
        if request.path not in METRICS_PATHS:
            return self._error("404 Not Found", "loopscope serves only /metrics"), False
        if request.method not in ("GET", "HEAD"):
            return self._error(
                "405 Method Not Allowed",
                "only GET and HEAD are allowed on /metrics",
                (("Allow", "GET, HEAD"),),
            ), False
        try:
            form = wanted(request.accept, request.accept_encoding, request.query)
        except (TypeError, ValueError):  # prometheus_client's parse of a version failed
            return self._error("400 Bad Request", "unreadable Accept header"), False
        exposition = self.exposition
        try:
            return exposition.answer(request.method == "HEAD", form), True
        except Exception as exc:
            # A collector of the registry (loopscope's or another) raised: this scrape fails
            # with 500, the server thread and the application go on.
            if not exposition.failures:
                logger().error(
                    "loopscope: building the /metrics exposition failed; answering 500 "
                    "(logged once)",
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
            exposition.failures = 1
            return self._error(
                "500 Internal Server Error", "the metrics could not be collected"
            ), False

    def _events(self, method: str, events: Callable[[], bytes]) -> bytes:
        """The answer on ``EVENTS_PATH``: the recent events as JSON, built for each request
        (only clients like ``loopscope top`` ask, about once a second)."""
        if method not in ("GET", "HEAD"):
            return self._error(
                "405 Method Not Allowed",
                f"only GET and HEAD are allowed on {EVENTS_PATH}",
                (("Allow", "GET, HEAD"),),
            )
        body = events()
        full = _response("200 OK", [("Content-Type", _JSON)], body, self.exposition.now())
        return full[: len(full) - len(body)] if method == "HEAD" else full


class MetricsServer:
    """Serves the registry over HTTP(S) from a daemon thread."""

    def __init__(
        self,
        addr: str,
        port: int,
        registry: CollectorRegistry,
        options: Options,
        before_build: Callable[[], None] | None = None,
        events: Callable[[], bytes] | None = None,
    ) -> None:
        """TLS and basic authentication come from ``options``; ``before_build`` is called on
        the endpoint's thread before each build of the exposition (at most once per
        ``REUSE_SECONDS``); what it raises fails that scrape.  ``events`` (None: not
        served) gives the JSON document served on ``EVENTS_PATH``."""
        tls: ssl.SSLContext | None = None
        credentials: bytes | None = None
        if options.tls_certfile is not None:
            try:
                tls = tls_context(options)
            except ConfigError as exc:  # the files changed since validation
                raise OSError(str(exc)) from None
        if options.basic_auth_username is not None and options.basic_auth_password is not None:
            credentials = _credentials(options.basic_auth_username, options.basic_auth_password)
        self.httpd = _Endpoint(addr, port, registry, tls, credentials, before_build, events)
        self.port: int = self.httpd.server_port
        self.addr = addr
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="loopscope-metrics", daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        """Stop serving and free the port."""
        self.httpd.shutdown()
        self.thread.join(timeout=5)
        self.httpd.server_close()

    def hold_builds(self, timeout: float) -> bool:
        """Keep the endpoint's thread from building an exposition until
        :meth:`release_builds`, waiting up to ``timeout`` seconds for a build under way to
        end; False (nothing held) when it did not.  Held across ``os.fork()``, so that no
        thread of the parent holds the registry's lock when the child starts."""
        return self.httpd.exposition.build_lock.acquire(timeout=timeout)

    def release_builds(self) -> None:
        """Let the endpoint build again (after a successful :meth:`hold_builds`)."""
        self.httpd.exposition.build_lock.release()

    def close_in_forked_child(self) -> None:
        """In a forked child: close the inherited listening socket only; the serving thread
        stayed in the parent (shutdown() would wait for it forever)."""
        with contextlib.suppress(Exception):
            self.httpd.socket.close()
