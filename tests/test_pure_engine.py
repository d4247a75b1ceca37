"""The pure-Python Engine (loopscope._pure.endpoint) against the C one (loopscope._speedups):
the same endpoint set-up (as _server._Endpoint makes it) on each, the same ``respond``, and
what clients get compared.  Every scenario runs on both engines (the C half is skipped where
the accelerator is not built) with the same expectations, and the deterministic ones are
also run on both side by side and compared byte for byte."""

from __future__ import annotations

import importlib
import pickle
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from loopscope._pure.endpoint import Engine as PureEngine

_speedups: Any
try:
    _speedups = importlib.import_module("loopscope._speedups")
except ImportError:  # a pure-Python install
    _speedups = None

TIMEOUT = 10.0
ENGINES = [
    pytest.param(
        "c", marks=pytest.mark.skipif(_speedups is None, reason="the C accelerator is not built")
    ),
    "pure",
]
needs_c = pytest.mark.skipif(_speedups is None, reason="the C accelerator is not built")

GET = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
HEAD = b"HEAD /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _engine_type(kind: str) -> Any:
    if kind == "c":
        assert _speedups is not None
        return _speedups.Engine
    return PureEngine


def _http(status: str, body: bytes, length: int | None = None) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(body) if length is None else length}"
        "\r\nConnection: close\r\n\r\n"
    ).encode() + body


class Respond:
    """A deterministic ``respond``: the answer names the head and how many questions were
    asked before it, so that a kept answer shows; HEAD gets the head of the answer only;
    ``body_size`` pads the body (large answers, written in parts)."""

    def __init__(self, fresh_for: float = 0.0, body_size: int = 0) -> None:
        self.fresh_for = fresh_for
        self.body_size = body_size
        self.heads: list[bytes | None] = []
        self.lock = threading.Lock()

    def __call__(self, head: bytes | None) -> tuple[bytes, float]:
        with self.lock:
            self.heads.append(head)
            number = len(self.heads)
        if head is None:
            return _http("431 Request Header Fields Too Large", b"request too large\n"), 0.0
        body = b"answer %d to %s\n" % (number, head.split(b"\r\n")[0])
        body += b"." * max(0, self.body_size - len(body))
        if head.startswith(b"HEAD "):
            return _http("200 OK", b"", len(body)), self.fresh_for
        return _http("200 OK", body), self.fresh_for


class Endpoint:
    """What _server._Endpoint sets up around an engine: a non-blocking listener, a
    socketpair to wake the engine, a thread calling run() until stopped."""

    def __init__(
        self,
        kind: str,
        respond: Callable[[bytes | None], Any],
        *,
        timeout: float = 5.0,
        max_connections: int = 4,
        max_head: int = 64,
        start: bool = True,
    ) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.engine = _engine_type(kind)(
            self.listener.fileno(),
            self.wake_r.fileno(),
            respond,
            timeout,
            max_connections,
            max_head,
        )
        self.stopping = False
        self.thread: threading.Thread | None = None
        if start:
            self.start()

    def _serve(self) -> None:
        while not self.stopping:
            self.engine.run()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def wait_connections(self, count: int) -> None:
        _until(lambda: self.engine.connections == count)

    def close(self) -> None:
        if self.listener.fileno() < 0:
            return  # closed already
        self.stopping = True
        self.engine.stop()
        self.wake_w.send(b"x")
        if self.thread is not None:
            self.thread.join(TIMEOUT)
            assert not self.thread.is_alive()
        self.engine.close_all()
        for sock in (self.listener, self.wake_r, self.wake_w):
            sock.close()


def _until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def _read_all(sock: socket.socket, note_reset: bool = False) -> bytes:
    """Everything up to the end of the stream; a reset ends it too, and is noted as
    ``<reset>`` when asked for."""
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except ConnectionResetError:
        if note_reset:
            received += b"<reset>"
    return received


def _exchange(port: int, *chunks: bytes, pause: float = 0.0, note_reset: bool = False) -> bytes:
    with _connect(port) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
            if pause:
                time.sleep(pause)
        return _read_all(sock, note_reset)


@pytest.fixture(name="serve")
def fixture_serve() -> Iterator[Callable[..., Endpoint]]:
    endpoints: list[Endpoint] = []

    def serve(kind: str, respond: Callable[[bytes | None], Any], **kwargs: Any) -> Endpoint:
        endpoint = Endpoint(kind, respond, **kwargs)
        endpoints.append(endpoint)
        return endpoint

    yield serve
    for endpoint in endpoints:
        endpoint.close()


# --- the scenarios: each returns what clients (and respond) saw -------------------------

Observation = dict[str, Any]


def _get_and_head(serve: Callable[..., Endpoint], kind: str) -> Observation:
    respond = Respond()
    endpoint = serve(kind, respond)
    get = _exchange(endpoint.port, GET)
    head = _exchange(endpoint.port, HEAD)
    return {"get": get, "head": head, "asked": respond.heads}


def _keep_alive(serve: Callable[..., Endpoint], kind: str) -> Observation:
    """One request per connection: the answer says ``Connection: close`` and the engine
    closes it; a second request on it gets nothing."""
    respond = Respond()
    endpoint = serve(kind, respond)
    with _connect(endpoint.port) as sock:
        sock.sendall(GET)
        first = _read_all(sock)
        try:
            sock.sendall(GET)
            second = _read_all(sock)
        except (BrokenPipeError, ConnectionResetError):
            second = b""
    endpoint.wait_connections(0)
    return {"first": first, "second": second, "asked": respond.heads}


def _pipelined(serve: Callable[..., Endpoint], kind: str) -> Observation:
    """Two heads in one write: the first is answered, the rest read and dropped."""
    respond = Respond()
    endpoint = serve(kind, respond, max_head=256)
    other = GET.replace(b"/metrics", b"/other")
    # The input beyond the head is read before the connection is closed: an end of
    # stream, not a reset.
    answer = _exchange(endpoint.port, GET + other, note_reset=True)
    return {"answer": answer, "asked": respond.heads}


def _oversized_heads(serve: Callable[..., Endpoint], kind: str) -> Observation:
    """max_head bytes of head are served; one more is too long (respond(None): the 431),
    whether it came at once or in parts, with or without its blank line."""
    respond = Respond(fresh_for=3600.0)
    endpoint = serve(kind, respond, max_head=64)
    line = b"GET /metrics HTTP/1.1\r\nX: "
    exact = line + b"a" * (64 - len(line))
    over = exact + b"a"
    answers = [
        _exchange(endpoint.port, exact + b"\r\n\r\n"),
        _exchange(endpoint.port, over + b"\r\n\r\n", note_reset=True),
        _exchange(endpoint.port, over + b"\r\n\r\n" + b"body" * 1000, note_reset=True),
        _exchange(endpoint.port, b"x" * 100_000),
        _exchange(endpoint.port, b"x" * 30, b"y" * 30, b"z" * 30, pause=0.02),
        _exchange(endpoint.port, exact[:10], exact[10:] + b"\r\n", b"\r\n", pause=0.02),
    ]
    endpoint.wait_connections(0)
    return {"answers": answers, "asked": respond.heads}


def _split_blank_line(serve: Callable[..., Endpoint], kind: str) -> Observation:
    """The end of the head found across reads, byte by byte."""
    respond = Respond()
    endpoint = serve(kind, respond)
    request = b"GET / HTTP/1.1\r\n\r\n"
    answer = _exchange(endpoint.port, *(request[k : k + 1] for k in range(len(request))))
    return {"answer": answer, "asked": respond.heads}


def _cache_expiry(serve: Callable[..., Endpoint], kind: str) -> Observation:
    """A head answered with fresh_for > 0 is answered from the copy until then, respond
    is asked again after; another head is kept apart."""
    respond = Respond(fresh_for=0.5)
    endpoint = serve(kind, respond)
    first = _exchange(endpoint.port, GET)
    again = _exchange(endpoint.port, GET)
    other = _exchange(endpoint.port, HEAD)
    time.sleep(0.6)
    later = _exchange(endpoint.port, GET)
    return {"answers": [first, again, other, later], "asked": respond.heads}


def _not_kept(serve: Callable[..., Endpoint], kind: str) -> Observation:
    """fresh_for 0 (or less, or NaN): respond is asked every time."""
    results: list[tuple[bytes, float]] = [
        (b"zero", 0.0),
        (b"negative", -1.0),
        (b"nan", float("nan")),
        (b"int", 3600),
        (b"not asked", 0.0),
    ]
    asked: list[bytes | None] = []

    def respond(head: bytes | None) -> tuple[bytes, float]:
        asked.append(head)
        return results.pop(0)

    endpoint = serve(kind, respond)
    answers = [_exchange(endpoint.port, GET) for _ in range(5)]
    return {"answers": answers, "asked": asked}


def _eviction(serve: Callable[..., Endpoint], kind: str) -> Observation:
    """Eight heads are kept; a ninth takes the oldest slot, and so on in turn."""
    respond = Respond(fresh_for=3600.0)
    endpoint = serve(kind, respond)
    heads = [b"GET /%d HTTP/1.1\r\n\r\n" % k for k in range(9)]
    answers = [_exchange(endpoint.port, head) for head in [*heads, heads[0], heads[8], heads[1]]]
    return {"answers": answers, "asked": respond.heads}


def _large_answer(serve: Callable[..., Endpoint], kind: str) -> Observation:
    """An answer larger than the socket buffers is written in parts to a slow reader."""
    respond = Respond(body_size=8 << 20)
    endpoint = serve(kind, respond)
    with _connect(endpoint.port) as sock:
        sock.sendall(GET)
        time.sleep(0.2)  # the engine's first send() fills the buffers and waits
        received = b""
        while data := sock.recv(7000):
            received += data
    return {"answer": received, "asked": respond.heads}


def _respond_faults(
    serve: Callable[..., Endpoint], kind: str, monkeypatch: pytest.MonkeyPatch
) -> Observation:
    """What respond() raises, or a wrong answer, goes to sys.unraisablehook with respond
    as the object; that connection is dropped; the engine goes on."""
    answers: list[Any] = [
        RuntimeError("injected"),
        "not a tuple",
        (b"one",),
        (b"x", "1.0"),
        (bytearray(b"x"), 0.0),
        [b"x", 0.0],
        (b"x", 0.0, 1),
        (b"ok", 0.0),
    ]
    reported: list[tuple[Any, str, bool, Any]] = []

    def respond(head: bytes | None) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(
        sys,
        "unraisablehook",
        lambda u: reported.append((u.exc_type, str(u.exc_value), u.object is respond, u.err_msg)),
    )
    endpoint = serve(kind, respond)
    received = [_exchange(endpoint.port, GET) for _ in range(8)]
    endpoint.wait_connections(0)
    return {"received": received, "reported": reported}


SCENARIOS: dict[str, Callable[..., Observation]] = {
    "get_and_head": _get_and_head,
    "keep_alive": _keep_alive,
    "pipelined": _pipelined,
    "oversized_heads": _oversized_heads,
    "split_blank_line": _split_blank_line,
    "cache_expiry": _cache_expiry,
    "not_kept": _not_kept,
    "eviction": _eviction,
    "large_answer": _large_answer,
}


# --- each engine on its own -------------------------------------------------------------


@pytest.mark.parametrize("kind", ENGINES)
class TestEachEngine:
    def test_get_and_head(self, serve: Callable[..., Endpoint], kind: str) -> None:
        seen = _get_and_head(serve, kind)
        head = GET[: GET.index(b"\r\n\r\n")]
        assert seen["get"] == _http("200 OK", b"answer 1 to GET /metrics HTTP/1.1\n")
        assert seen["head"] == _http("200 OK", b"", len(b"answer 2 to HEAD /metrics HTTP/1.1\n"))
        assert seen["asked"] == [head, HEAD[:-4]]

    def test_keep_alive_is_one_request(self, serve: Callable[..., Endpoint], kind: str) -> None:
        seen = _keep_alive(serve, kind)
        assert seen["first"] == _http("200 OK", b"answer 1 to GET /metrics HTTP/1.1\n")
        assert seen["second"] == b""
        assert len(seen["asked"]) == 1

    def test_pipelined(self, serve: Callable[..., Endpoint], kind: str) -> None:
        seen = _pipelined(serve, kind)
        assert seen["answer"] == _http("200 OK", b"answer 1 to GET /metrics HTTP/1.1\n")
        assert seen["asked"] == [GET[:-4]]

    def test_oversized_heads(self, serve: Callable[..., Endpoint], kind: str) -> None:
        seen = _oversized_heads(serve, kind)
        too_long = _http("431 Request Header Fields Too Large", b"request too large\n")
        answers = seen["answers"]
        assert answers[0].startswith(b"HTTP/1.1 200 OK") and answers[5] == answers[0]
        assert answers[1:5] == [too_long] * 4
        assert seen["asked"][1:] == [None] * 4  # nothing kept for a head too long

    def test_split_blank_line(self, serve: Callable[..., Endpoint], kind: str) -> None:
        seen = _split_blank_line(serve, kind)
        assert seen["asked"] == [b"GET / HTTP/1.1"]
        assert seen["answer"] == _http("200 OK", b"answer 1 to GET / HTTP/1.1\n")

    def test_cache(self, serve: Callable[..., Endpoint], kind: str) -> None:
        seen = _cache_expiry(serve, kind)
        first, again, other, later = seen["answers"]
        assert again == first
        assert b"answer 2 to HEAD" not in other  # HEAD: no body, but asked
        assert later == first.replace(b"answer 1", b"answer 3")
        assert seen["asked"] == [GET[:-4], HEAD[:-4], GET[:-4]]

    def test_not_kept(self, serve: Callable[..., Endpoint], kind: str) -> None:
        seen = _not_kept(serve, kind)
        assert seen["answers"] == [b"zero", b"negative", b"nan", b"int", b"int"]
        assert len(seen["asked"]) == 4

    def test_eviction(self, serve: Callable[..., Endpoint], kind: str) -> None:
        seen = _eviction(serve, kind)
        heads = [b"GET /%d HTTP/1.1" % k for k in range(9)]
        assert seen["asked"] == [*heads, heads[0], heads[1]]

    def test_large_answer_written_in_parts(self, serve: Callable[..., Endpoint], kind: str) -> None:
        seen = _large_answer(serve, kind)
        assert seen["answer"] == Respond(body_size=8 << 20)(GET[:-4])[0]

    def test_respond_faults(
        self, serve: Callable[..., Endpoint], kind: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        seen = _respond_faults(serve, kind, monkeypatch)
        assert seen["received"] == [b""] * 7 + [b"ok"]
        assert [r[0] for r in seen["reported"]] == [RuntimeError] + [TypeError] * 6
        assert all(r[2] and r[3] is None for r in seen["reported"])
        assert seen["reported"][1][1] == "respond() must return (bytes, float), not 'not a tuple'"

    def test_silent_client_times_out(self, serve: Callable[..., Endpoint], kind: str) -> None:
        """Half a head, then nothing: closed once the timeout has passed."""
        respond = Respond()
        endpoint = serve(kind, respond, timeout=0.5)
        with _connect(endpoint.port) as sock:
            sock.sendall(GET[:20])
            started = time.monotonic()
            assert _read_all(sock) == b""
            waited = time.monotonic() - started
        assert 0.4 <= waited < 5.0
        endpoint.wait_connections(0)
        assert respond.heads == []

    def test_stalled_reader_times_out(self, serve: Callable[..., Endpoint], kind: str) -> None:
        """A client that stops reading a large answer is dropped after the timeout."""
        endpoint = serve(kind, Respond(body_size=32 << 20), timeout=0.5)
        with _connect(endpoint.port) as sock:
            sock.sendall(GET)
            endpoint.wait_connections(1)
            started = time.monotonic()
            endpoint.wait_connections(0)  # about 0.5 s after its last send
            assert time.monotonic() - started >= 0.4
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")

    def test_client_gone_mid_answer(self, serve: Callable[..., Endpoint], kind: str) -> None:
        """A client that closes while its answer is written: that connection is closed,
        the next client is answered."""
        respond = Respond(body_size=32 << 20)
        endpoint = serve(kind, respond)
        sock = _connect(endpoint.port)
        sock.sendall(GET)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        sock.close()  # unread data: a reset
        endpoint.wait_connections(0)
        with _connect(endpoint.port) as other:
            other.sendall(HEAD)
            assert _read_all(other).startswith(b"HTTP/1.1 200 OK")
        assert len(respond.heads) == 2

    def test_connection_limit(self, serve: Callable[..., Endpoint], kind: str) -> None:
        """Past max_connections, new connections are closed at once, unread; the silent
        ones keep their places; once they are gone, clients are answered again."""
        respond = Respond()
        endpoint = serve(kind, respond, max_connections=4)
        idle = [_connect(endpoint.port) for _ in range(4)]
        try:
            endpoint.wait_connections(4)
            try:
                late = _exchange(endpoint.port, GET)
            except (BrokenPipeError, ConnectionResetError):
                late = b""
            assert late == b""
            assert endpoint.engine.connections == 4
        finally:
            for sock in idle:
                sock.close()
        endpoint.wait_connections(0)
        assert _exchange(endpoint.port, GET).startswith(b"HTTP/1.1 200 OK")
        assert respond.heads == [GET[:-4]]

    def test_wake_returns_and_keeps_connections(
        self, serve: Callable[..., Endpoint], kind: str
    ) -> None:
        """A byte on the wake descriptor makes run() return (the byte read); open
        connections stay open and the next run() goes on with them."""
        respond = Respond()
        endpoint = serve(kind, respond, start=False)
        engine = endpoint.engine
        first = threading.Thread(target=engine.run, daemon=True)
        first.start()
        with _connect(endpoint.port) as sock:
            sock.sendall(GET[:20])
            endpoint.wait_connections(1)
            endpoint.wake_w.send(b"xyz")
            first.join(TIMEOUT)
            assert not first.is_alive()
            assert engine.connections == 1
            with pytest.raises(BlockingIOError):
                endpoint.wake_r.recv(16)  # drained
            endpoint.start()
            sock.sendall(GET[20:])
            assert _read_all(sock).startswith(b"HTTP/1.1 200 OK")
        assert respond.heads == [GET[:-4]]

    def test_stop_from_another_thread(self, serve: Callable[..., Endpoint], kind: str) -> None:
        """stop() from any thread makes run() return at its next turn (here: the next
        connection, which is then not accepted); a stopped engine's run() returns at once."""
        respond = Respond()
        endpoint = serve(kind, respond, start=False)
        engine = endpoint.engine
        serving = threading.Thread(target=engine.run, daemon=True)
        serving.start()
        assert _exchange(endpoint.port, GET).startswith(b"HTTP/1.1 200 OK")
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        stopper.join(TIMEOUT)
        with _connect(endpoint.port) as sock:
            sock.sendall(GET)
            serving.join(TIMEOUT)
            assert not serving.is_alive()
            assert engine.connections == 0
        again = threading.Thread(target=engine.run, daemon=True)
        again.start()
        again.join(TIMEOUT)
        assert not again.is_alive()
        assert len(respond.heads) == 1

    def test_close_all_and_run_while_running(
        self, serve: Callable[..., Endpoint], kind: str
    ) -> None:
        endpoint = serve(kind, Respond())
        engine = endpoint.engine
        _until(lambda: endpoint.thread is not None and endpoint.thread.is_alive())
        with _connect(endpoint.port) as sock:
            sock.sendall(GET[:10])
            endpoint.wait_connections(1)  # run() is running
            with pytest.raises(RuntimeError, match=r"^Engine.close_all\(\) while run\(\)"):
                engine.close_all()
            with pytest.raises(RuntimeError, match=r"^Engine.run\(\) is already running$"):
                engine.run()
            assert engine.connections == 1

    def test_close_all_closes_connections(self, serve: Callable[..., Endpoint], kind: str) -> None:
        endpoint = serve(kind, Respond())
        with _connect(endpoint.port) as sock:
            sock.sendall(GET[:10])
            endpoint.wait_connections(1)
            endpoint.close()
            assert endpoint.engine.connections == 0
            assert _read_all(sock) == b""

    def test_listener_and_wake_left_open(self, kind: str) -> None:
        """The engine never closes the descriptors it was given."""
        endpoint = Endpoint(kind, Respond())
        assert _exchange(endpoint.port, GET).startswith(b"HTTP/1.1 200 OK")
        endpoint.stopping = True
        endpoint.engine.stop()
        endpoint.wake_w.send(b"x")
        assert endpoint.thread is not None
        endpoint.thread.join(TIMEOUT)
        endpoint.engine.close_all()
        del endpoint.engine
        assert endpoint.listener.fileno() >= 0 and endpoint.wake_r.fileno() >= 0
        endpoint.listener.getsockname()  # still open: no EBADF
        endpoint.wake_r.getsockname()
        for sock in (endpoint.listener, endpoint.wake_r, endpoint.wake_w):
            sock.close()


# --- the two side by side ---------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_same_as_c(serve: Callable[..., Endpoint], scenario: str) -> None:
    """Byte for byte what the C engine gives, and the same questions to respond()."""
    run = SCENARIOS[scenario]
    assert run(serve, "pure") == run(serve, "c")


@needs_c
def test_same_faults_as_c(serve: Callable[..., Endpoint], monkeypatch: pytest.MonkeyPatch) -> None:
    assert _respond_faults(serve, "pure", monkeypatch) == _respond_faults(serve, "c", monkeypatch)


def _outcome(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


@needs_c
def test_same_interface_as_c() -> None:
    """The same public names; the same arguments (by keyword too) and the same errors for
    bad ones; not subclassable, not picklable, no weak references."""
    assert _speedups is not None
    c_type: Any = _speedups.Engine
    public = sorted(name for name in dir(c_type) if not name.startswith("_"))
    assert public == sorted(name for name in dir(PureEngine) if not name.startswith("_"))
    assert public == ["close_all", "connections", "run", "stop"]
    cases: list[tuple[Any, ...]] = [
        (0, 0, print, 5.0, 4, 64),
        (0, 0, None, 5.0, 4, 64),
        (0, 0, print, 5.0, 0, 64),
        (0, 0, print, 5.0, 65537, 64),
        (0, 0, print, 5.0, 4, 0),
        (0, 0, print, 5.0, 4, (1 << 24) + 1),
        (0, 0, print, 0.0, 4, 64),
        (0, 0, print, float("nan"), 4, 64),
        (0, 0, print, "5", 4, 64),
        (0.5, 0, print, 5.0, 4, 64),
        (2**40, 0, print, 5.0, 4, 64),
        (0, -(2**40), print, 5.0, 4, 64),
        (True, 0, print, 5, 4, 64),
    ]
    for args in cases:
        assert _outcome(partial(c_type, *args)) == _outcome(partial(PureEngine, *args)), args
    keywords: dict[str, Any] = {
        "listener": 0,
        "wake": 0,
        "respond": print,
        "timeout": 5.0,
        "max_connections": 4,
        "max_head": 64,
    }
    for engine_type in (c_type, PureEngine):
        engine = engine_type(**keywords)
        assert engine.connections == 0
        engine.close_all()
        forbidden: Callable[..., object]
        for forbidden in (
            partial(type, "Sub", (engine_type,), {}),
            partial(pickle.dumps, engine),
            partial(weakref.ref, engine),
            partial(setattr, engine, "connections", 1),
        ):
            with pytest.raises((TypeError, AttributeError)):
                forbidden()
