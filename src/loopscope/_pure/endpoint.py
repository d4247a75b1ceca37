"""The pure-Python twin of ``loopscope._speedups.Engine`` (src/loopscope/_c/endpoint.c): the
socket work of the /metrics endpoint.

Same constructor, methods and behaviour as the C engine: run() accepts, reads, writes and
closes connections with poll(2) over non-blocking sockets until the wake descriptor is
readable or stop() was called; for each request it asks ``respond(head)`` (the bytes before
the blank line, or None when the head grew past ``max_head``) for ``(answer, fresh_for)``,
writes the answer and closes the connection (one request per connection: what the client
sent beyond the head is read and dropped).  An answer is kept for ``fresh_for`` seconds and
given, without asking again, to a request whose head is the same byte for byte (eight heads
are kept).  It never closes the listening or the wake descriptor: they belong to its caller.

The difference is the GIL: the C engine releases it for everything but the call to
``respond``, this one holds it whenever it is not blocked in poll() or a socket call.  It
is written as a line-by-line transcription of the C file, so that the two stay comparable:
the same order of work in a turn of the loop, the same clock (``time.monotonic()``, which is
the C engine's ``clock_gettime_seconds()``), the same timeouts rounded the same way.
"""

from __future__ import annotations

import operator
import os
import select
import socket
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any, NoReturn, SupportsIndex, final

__all__ = ["Engine"]

_CACHE_SLOTS = 8
_READ_CHUNK = 4096
#: Connections accepted per turn of the loop: a burst of scrapers is taken in quickly, and a
#: flood of them still lets the open ones move on.
_ACCEPTS_PER_TURN = 16
_POLLIN: int = select.POLLIN
_POLLOUT: int = select.POLLOUT
_MSG_NOSIGNAL: int = getattr(socket, "MSG_NOSIGNAL", 0)
_INT_MAX = 2**31 - 1
_INT_MIN = -(2**31)
_SSIZE_MAX = sys.maxsize
_SSIZE_MIN = -sys.maxsize - 1

Respond = Callable[[bytes | None], Any]


class _Entry:
    """A kept answer: ``head`` None means the slot is free."""

    __slots__ = ("answer", "head", "until")

    def __init__(self) -> None:
        self.head: bytes | None = None
        self.answer = b""
        self.until = 0.0


class _Conn:
    __slots__ = ("deadline", "events", "inbox", "out", "sent", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        #: POLLIN while reading the request, POLLOUT while writing the answer
        self.events = _POLLIN
        self.deadline = deadline
        self.inbox: bytearray | None = None
        self.out: bytes | None = None  # None while the request is read
        self.sent = 0


# --- argument conversions as PyArg_ParseTuple's "i", "n" and "d" make them ---------------


def _as_int(value: object, low: int, high: int) -> int:
    number = operator.index(value)  # type: ignore[arg-type]
    if number < low:
        raise OverflowError("signed integer is less than minimum")
    if number > high:
        raise OverflowError("signed integer is greater than maximum")
    return number


def _as_double(value: object) -> float:
    """PyFloat_AsDouble(): a float, anything with __float__, or an integer (__index__)."""
    if isinstance(value, float):
        return float.__float__(value)
    if hasattr(type(value), "__float__"):
        return float(value)  # type: ignore[arg-type]
    if hasattr(type(value), "__index__"):
        return float(operator.index(value))  # type: ignore[arg-type]
    raise TypeError(f"must be real number, not {type(value).__name__}")


def _answer_of(result: object) -> tuple[bytes, float]:
    """respond()'s ``(answer, fresh_for)``, checked as PyArg_ParseTuple(result, "Sd")
    checks it; whatever fails (the conversion of fresh_for included) is this TypeError."""
    try:
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bytes):
            answer: bytes = result[0]
            fresh_for = _as_double(result[1])
            # A copy of a subclass's bytes, as the C engine keeps its own copy.
            return answer if type(answer) is bytes else memoryview(answer).tobytes(), fresh_for
    except BaseException:
        pass  # replaced, as PyErr_Format() replaces what PyArg_ParseTuple() raised
    raise TypeError(f"respond() must return (bytes, float), not {repr(result)[:100]}")


# --- sys.unraisablehook, as PyErr_WriteUnraisable() calls it ----------------------------

_hook_args_type: Any = None
_hook_args_lock = threading.Lock()


class _Marker(Exception):
    pass


def _unraisable_hook_args_type() -> Any:
    """The type of what sys.unraisablehook is given (``UnraisableHookArgs``, which the
    default hook insists on and Python does not name), found once by having one exception
    reported; None when it could not be found.  While it is being found, what anything else
    reports goes to the hook in place."""
    global _hook_args_type
    with _hook_args_lock:
        if _hook_args_type is None:
            marker = _Marker()
            found: list[type[Any]] = []
            previous = sys.unraisablehook

            def capture(args: Any) -> None:
                if getattr(args, "exc_value", None) is marker:
                    found.append(type(args))
                else:
                    previous(args)

            class _Raises:
                def __del__(self) -> None:
                    raise marker

            sys.unraisablehook = capture
            try:
                _Raises()
            finally:
                if sys.unraisablehook is capture:
                    sys.unraisablehook = previous
            _hook_args_type = found[0] if found else False
        return _hook_args_type or None


def _write_unraisable(exc: BaseException, obj: object) -> None:
    """Report ``exc`` to sys.unraisablehook with ``obj`` as the object, as the C engine's
    PyErr_WriteUnraisable(respond) does."""
    fields = (type(exc), exc, exc.__traceback__, None, obj)
    args_type = _unraisable_hook_args_type()
    hook_args: Any = (
        args_type(fields)
        if args_type is not None
        else types.SimpleNamespace(
            exc_type=fields[0],
            exc_value=fields[1],
            exc_traceback=fields[2],
            err_msg=fields[3],
            object=fields[4],
        )
    )
    try:
        sys.unraisablehook(hook_args)
    except BaseException as hook_exc:
        # As CPython does when the hook itself fails: that is reported, then the
        # exception with the default hook.
        import traceback

        stream = sys.stderr
        if stream is not None:
            stream.write("Exception ignored in sys.unraisablehook: ")
            traceback.print_exception(type(hook_exc), hook_exc, hook_exc.__traceback__)
            stream.write(f"Exception ignored in: {obj!r}\n")
            traceback.print_exception(type(exc), exc, exc.__traceback__)


# --- the engine -------------------------------------------------------------------------


@final
class Engine:
    """Engine(listener, wake, respond, timeout, max_connections, max_head): the socket
    work of the /metrics endpoint, in Python (the twin of ``loopscope._speedups.Engine``).

    Everything is touched by the serving thread only, except ``_stopping``, which stop()
    sets from any thread, and ``connections``, which any thread may read."""

    __slots__ = (
        "_cache",
        "_conns",
        "_listener",
        "_max_connections",
        "_max_head",
        "_next_slot",
        "_respond",
        "_running",
        "_stopping",
        "_timeout",
        "_wake",
    )

    _listener: int
    _wake: int
    _respond: Respond
    _timeout: float
    _max_connections: int
    _max_head: int
    _conns: list[_Conn]
    _cache: list[_Entry]
    _next_slot: int
    _running: bool
    _stopping: bool

    def __new__(
        cls,
        listener: int,
        wake: int,
        respond: Respond,
        timeout: float,
        max_connections: int,
        max_head: int,
    ) -> Engine:
        listener = _as_int(listener, _INT_MIN, _INT_MAX)
        wake = _as_int(wake, _INT_MIN, _INT_MAX)
        timeout = _as_double(timeout)
        max_connections = _as_int(max_connections, _SSIZE_MIN, _SSIZE_MAX)
        max_head = _as_int(max_head, _SSIZE_MIN, _SSIZE_MAX)
        if not callable(respond):
            raise TypeError("Engine: respond must be callable")
        if (
            max_connections < 1
            or max_connections > 65536
            or max_head < 1
            or max_head > (1 << 24)
            or not (timeout > 0)
        ):
            raise ValueError("Engine: max_connections, max_head and timeout must be positive")
        self = object.__new__(cls)
        self._listener = listener
        self._wake = wake
        self._respond = respond
        self._timeout = timeout
        self._max_connections = max_connections
        self._max_head = max_head
        self._conns = []
        self._cache = [_Entry() for _ in range(_CACHE_SLOTS)]
        self._next_slot = 0
        self._running = False
        self._stopping = False
        return self

    def __init_subclass__(cls, **kwargs: Any) -> NoReturn:
        raise TypeError(f"type '{Engine.__module__}.Engine' is not an acceptable base type")

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError(f"cannot pickle '{type(self).__module__}.Engine' object")

    def __del__(self) -> None:
        if getattr(self, "_conns", None) is not None:
            self._clear_state()

    # --- the answer cache ---------------------------------------------------------------

    def _cache_find(self, head: bytes, now: float) -> bytes | None:
        for entry in self._cache:
            if entry.head is not None and entry.until > now and entry.head == head:
                return entry.answer
        return None

    def _cache_store(self, head: bytes, answer: bytes, until: float) -> None:
        slot: _Entry | None = None
        for entry in self._cache:
            if entry.head is not None and entry.head == head:
                slot = entry  # the same head: its answer is replaced
                break
        if slot is None:
            for entry in self._cache:
                if entry.head is None:
                    slot = entry
                    break
        if slot is None:
            slot = self._cache[self._next_slot]
            self._next_slot = (self._next_slot + 1) % _CACHE_SLOTS
        slot.head = head
        slot.answer = answer
        slot.until = until

    # --- connections --------------------------------------------------------------------

    def _conn_close(self, i: int) -> None:
        conns = self._conns
        conn = conns[i]
        last = conns.pop()
        if i < len(conns):
            conns[i] = last
        conn.sock.close()

    def _ask_python(self, head: bytes | None) -> bytes | None:
        """Python's answer to ``head`` (None: too large), or None when it could not be had."""
        respond = self._respond
        try:
            answer, fresh_for = _answer_of(respond(head))
        except BaseException as exc:
            # As the C engine does, whatever it is (KeyboardInterrupt included): reported,
            # that connection is dropped, serving goes on.
            _write_unraisable(exc, respond)
            return None
        if head is not None and fresh_for > 0.0:
            self._cache_store(head, answer, time.monotonic() + fresh_for)
        return answer

    def _conn_write(self, i: int, now: float) -> bool:
        """Write what is left of the answer; closes the connection when it is all written
        or on an error.  Returns True when the connection was closed."""
        conn = self._conns[i]
        out = conn.out
        assert out is not None
        sock = conn.sock
        while conn.sent < len(out):
            try:
                n = sock.send(memoryview(out)[conn.sent :], _MSG_NOSIGNAL)
            except BlockingIOError:
                conn.events = _POLLOUT
                return False
            except OSError:
                break
            conn.sent += n
            conn.deadline = now + self._timeout
        if conn.sent == len(out):
            # What the client sent beyond the head (a body, the rest of an oversized head)
            # is read and dropped: closing with unread input would reset the connection,
            # and the client could lose the answer.
            for _ in range(64):
                try:
                    if not sock.recv(_READ_CHUNK):
                        break
                except OSError:
                    break
        self._conn_close(i)
        return True

    def _conn_progress(self, i: int, now: float) -> None:
        """Read what has come; once the head is complete, find its answer and start
        writing."""
        conn = self._conns[i]
        if conn.out is not None:
            self._conn_write(i, now)
            return
        capacity = self._max_head + 4  # the head and its blank line
        if conn.inbox is None:
            conn.inbox = bytearray()
        inbox = conn.inbox
        sock = conn.sock
        while True:
            space = capacity - len(inbox)
            try:
                data = sock.recv(min(space, _READ_CHUNK))
            except BlockingIOError:
                conn.events = _POLLIN
                return
            except OSError:
                self._conn_close(i)
                return
            if not data:  # the client went away before its request was complete
                self._conn_close(i)
                return
            start = max(len(inbox) - 3, 0)
            inbox += data
            end = inbox.find(b"\r\n\r\n", start)
            if end < 0 and len(inbox) < capacity:
                continue
            head = bytes(inbox[:end]) if end >= 0 else None
            answer = self._cache_find(head, now) if head is not None else None
            if answer is None:
                answer = self._ask_python(head)
                now = time.monotonic()
            # respond() may have run for a while, but nothing else touched the connections.
            if answer is None:
                self._conn_close(i)
                return
            conn.inbox = None
            conn.out = answer
            conn.sent = 0
            conn.deadline = now + self._timeout
            self._conn_write(i, now)
            return

    def _accept_nonblocking(self) -> socket.socket | None:
        # The listener is looked at through a socket object made for the moment and
        # detached at once: its descriptor is the caller's, never closed here, and its
        # blocking mode is left as it was (a socket object made while a default timeout is
        # set would make it non-blocking).
        try:
            blocking = os.get_blocking(self._listener)
            listener = socket.socket(fileno=self._listener)
        except (OSError, ValueError):
            return None
        try:
            listener.setblocking(blocking)
            sock, _addr = listener.accept()
        except OSError:
            return None
        finally:
            listener.detach()
        try:
            sock.setblocking(False)
        except OSError:
            sock.close()
            return None
        return sock

    def _accept_one(self, now: float) -> bool:
        """Accept one connection and serve it as far as it goes; False when there was none
        to accept."""
        sock = self._accept_nonblocking()
        if sock is None:
            return False  # nothing waiting, or a failed accept (the client sees it closed)
        if len(self._conns) >= self._max_connections:
            sock.close()
            return True
        self._conns.append(_Conn(sock, now + self._timeout))
        # The request is usually there already: no round through poll() for it.
        self._conn_progress(len(self._conns) - 1, now)
        return True

    def _serve(self) -> None:
        """The loop of run(): returns when woken or stopped; raises what poll() raises."""
        while True:
            if self._stopping:
                return
            now = time.monotonic()
            poller = select.poll()
            # poll(2) ignores negative descriptors; select.poll refuses them.
            if self._wake >= 0:
                poller.register(self._wake, _POLLIN)
            if self._listener >= 0:
                poller.register(self._listener, _POLLIN)
            timeout_ms = -1
            conns = self._conns
            fds: list[int] = []
            for conn in conns:
                fd = conn.sock.fileno()
                fds.append(fd)
                poller.register(fd, conn.events)
                left = conn.deadline - now
                if left <= 0:
                    ms = 0
                else:
                    scaled = left * 1000.0
                    ms = _INT_MAX if scaled >= _INT_MAX - 1 else int(scaled) + 1
                if timeout_ms < 0 or ms < timeout_ms:
                    timeout_ms = ms
            polled = len(conns)
            revents: dict[int, int] = {}
            for fd, events in poller.poll(timeout_ms):
                revents[fd] = revents.get(fd, 0) | events
            if self._wake >= 0 and revents.get(self._wake):
                while True:
                    try:
                        if not os.read(self._wake, 64):
                            break
                    except OSError:
                        break
                return
            listener_ready = self._listener >= 0 and bool(revents.get(self._listener, 0) & _POLLIN)
            now = time.monotonic()
            # From the last to the first: closing connection i moves the last one into its
            # place, which has been seen to already.
            for i in range(polled - 1, -1, -1):
                if revents.get(fds[i]):
                    self._conn_progress(i, now)
            # After a question to Python, the listener is looked at only if the endpoint is
            # not stopping: a stopped endpoint may have closed it, and its number reused.
            for _ in range(_ACCEPTS_PER_TURN):
                if not listener_ready or self._stopping:
                    break
                if not self._accept_one(now):
                    break
            now = time.monotonic()
            for i in range(len(conns) - 1, -1, -1):
                if conns[i].deadline <= now:
                    self._conn_close(i)

    def _clear_state(self) -> None:
        while self._conns:
            self._conn_close(len(self._conns) - 1)
        for entry in self._cache:
            entry.head = None
            entry.answer = b""

    # --- the Python interface -----------------------------------------------------------

    def run(self) -> None:
        """Serve until the wake descriptor is readable or stop() was called."""
        if self._running:
            raise RuntimeError("Engine.run() is already running")
        self._running = True
        try:
            self._serve()
        finally:
            self._running = False

    def stop(self) -> None:
        """Make run() return at its next turn (write to the wake descriptor to make it
        prompt)."""
        self._stopping = True

    def close_all(self) -> None:
        """Close every open connection and forget the kept answers."""
        if self._running:
            raise RuntimeError("Engine.close_all() while run() is running")
        self._clear_state()

    @property
    def connections(self) -> int:
        """Connections open."""
        return len(self._conns)
