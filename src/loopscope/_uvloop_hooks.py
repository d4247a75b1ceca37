"""Hooks for uvloop's loop.

uvloop's handles are Cython objects that cannot be subclassed, so the callback itself is
wrapped: the hot path's ``TimedCallback`` reads the clock around the user's callback and
records it in the probe's recorder.  Its ``repr()`` is the callback's, so uvloop's
"Exception in callback ..." messages still name the user's code, and exceptions pass
through it unchanged.

uvloop calls I/O callbacks straight from libuv, never through ``call_soon``: reader and
writer callbacks are wrapped at ``add_reader``/``add_writer``, and protocol methods
(``data_received``, ``connection_made``, ``datagram_received``, ...) are timed by wrapping
the protocol factory given to ``create_server``, ``create_connection`` and the like: each
protocol it makes gets timed instance attributes for those methods, which uvloop then looks
up (it caches ``data_received`` when the transport is made, after the factory ran).  A
protocol class with ``__slots__`` and no ``__dict__`` cannot take them and is left as it is.
uvloop has no selector to wrap: busy time is the sum of the measured callbacks.
"""

from __future__ import annotations

import weakref
from asyncio import AbstractEventLoop, TimerHandle
from collections.abc import Callable
from types import MethodType
from typing import Any

from . import _hotpath
from ._probe import LoopProbe, class_method, restack
from ._uvmetrics import idle_time_reader

__all__ = ["UvloopProbe"]

#: Protocol methods uvloop calls from libuv callbacks.
PROTOCOL_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "eof_received",
    "get_buffer",
    "buffer_updated",
    "datagram_received",
    "error_received",
    "pause_writing",
    "resume_writing",
    "pipe_data_received",
    "pipe_connection_lost",
    "process_exited",
)

#: Loop methods whose first argument is a protocol factory.
FACTORY_METHODS = (
    "create_server",
    "create_connection",
    "create_unix_server",
    "create_unix_connection",
    "connect_accepted_socket",
    "create_datagram_endpoint",
    "connect_read_pipe",
    "connect_write_pipe",
    "subprocess_exec",
    "subprocess_shell",
)


def timed_io(callback: Callable[..., object], probe: LoopProbe) -> Callable[..., object]:
    """``callback`` wrapped to measure itself, recorded in the probe's recorder."""
    wrapper: Callable[..., object] = _hotpath.twin.TimedIO(callback, probe.recorder)
    return wrapper


def is_timed_io(value: object) -> bool:
    """Whether ``value`` is already one of the I/O wrappers."""
    return isinstance(value, _hotpath.twin.TimedIO)


def instrument_protocol(protocol: object, probe: LoopProbe) -> None:
    """Give ``protocol`` timed instance attributes for the methods uvloop calls.

    A method defined on the protocol's class is held as its function and a weak reference
    to the protocol (shared by its wrappers), so that the protocol's ``__dict__`` does not
    refer back to the protocol: it is freed as soon as uvloop lets go of it, as without
    loopscope.  Anything else (an instance attribute, a static method, another descriptor,
    a class without weak references) is held as it is."""
    try:
        attributes = protocol.__dict__
    except AttributeError:
        return  # __slots__ without __dict__
    instance: weakref.ref[object] | None = None
    weak = True
    for name in PROTOCOL_METHODS:
        if is_timed_io(attributes.get(name)):
            continue
        method = getattr(protocol, name, None)
        if method is None or not callable(method):
            continue
        function = _class_function(protocol, name, method) if weak else None
        if function is not None and instance is None:
            try:
                instance = weakref.ref(protocol)
            except TypeError:  # __dict__ in __slots__, but not __weakref__
                weak, function = False, None
        if function is None:
            attributes[name] = timed_io(method, probe)
        else:
            attributes[name] = _hotpath.twin.TimedIO(function, probe.recorder, instance)


def _class_function(protocol: object, name: str, method: object) -> Callable[..., object] | None:
    """The function of ``method`` when it is ``protocol``'s plain method ``name``: a bound
    method made by the function found on the protocol's class.  None otherwise."""
    if not isinstance(method, MethodType) or method.__self__ is not protocol:
        return None
    if name in protocol.__dict__:
        return None
    for klass in type(protocol).__mro__:
        if name in vars(klass):
            return method.__func__ if vars(klass)[name] is method.__func__ else None
    return None


class UvloopProbe(LoopProbe):
    """Probe for ``uvloop.Loop``.

    Busy time is wall time in ``run_forever`` less libuv's own count of the time it spent
    idle in the kernel's event wait (``uv_metrics_idle_time``), where that can be reached;
    otherwise the sum of the measured callbacks (a lower bound).
    """

    implementation = "uvloop"
    methods_on_own_class = True
    busy_from_callbacks = True
    idle_nanoseconds: Callable[[], int] | None = None
    idle_mark = 0

    def install_hooks(self, loop: AbstractEventLoop) -> None:
        self.idle_nanoseconds = idle_time_reader(loop)
        if self.idle_nanoseconds is not None:
            self.busy_from_callbacks = False
            self.idle_mark = self.idle_nanoseconds()
        self.recorder.busy_from_callbacks = self.busy_from_callbacks
        recorder = self.recorder
        timed = _hotpath.twin.TimedCallback
        clock = self.clock
        loop_time = loop.time
        orig_call_soon = loop.call_soon
        orig_call_soon_threadsafe = loop.call_soon_threadsafe
        orig_call_later = loop.call_later
        #: The class's call_later, called with the loop first (see schedule_raw).
        self.raw_call_later: Callable[..., TimerHandle] | None = class_method(loop, "call_later")

        # What the hot path's Intercept falls back to for calls of another shape.
        # (Each drops its own frame from the stack that debug mode keeps.)
        def call_soon(callback: Any, *args: Any, context: Any = None) -> Any:
            handle: Any = orig_call_soon(timed(callback, recorder, clock()), *args, context=context)
            restack(getattr(handle, "_source_traceback", None))
            return handle

        def call_soon_threadsafe(callback: Any, *args: Any, context: Any = None) -> Any:
            handle: Any = orig_call_soon_threadsafe(
                timed(callback, recorder, clock()), *args, context=context
            )
            restack(getattr(handle, "_source_traceback", None))
            return handle

        # uvloop's call_at calls self.call_later, so this covers both.
        def call_later(delay: float, callback: Any, *args: Any, context: Any = None) -> Any:
            wrapped = timed(callback, recorder, loop_time() + max(delay, 0.0))
            timer: Any = orig_call_later(delay, wrapped, *args, context=context)
            restack(getattr(timer, "_source_traceback", None))
            return timer

        intercept = _hotpath.twin.Intercept
        hooks = (
            intercept("call_soon", recorder, orig_call_soon, call_soon),
            intercept("call_soon", recorder, orig_call_soon_threadsafe, call_soon_threadsafe),
            intercept("call_later", recorder, orig_call_later, call_later, loop_time),
        )
        self.patch(loop, "call_soon", hooks[0])
        self.patch(loop, "call_soon_threadsafe", hooks[1])
        self.patch(loop, "call_later", hooks[2])
        for name in ("add_reader", "add_writer"):
            original = getattr(loop, name)
            fallback = self._timed_fd_registration(original)
            self.patch(loop, name, intercept("add_reader", recorder, original, fallback))
        for name in FACTORY_METHODS:
            original = getattr(loop, name, None)
            if original is not None:
                self.patch(loop, name, self._timed_protocols(original))
        self.patch_lifecycle(loop)

    def remove_hooks(self, loop: AbstractEventLoop) -> None:
        super().remove_hooks(loop)
        self.raw_call_later = None  # the loop's own call_later is the class's again

    def on_run_start(self, loop: AbstractEventLoop) -> None:
        super().on_run_start(loop)
        if self.idle_nanoseconds is not None:
            self.idle_mark = self.idle_nanoseconds()

    def settle_busy(self) -> None:
        reader = self.idle_nanoseconds
        if reader is None or self.busy_mark is None:
            return
        now = self.clock()
        idle = reader()
        busy = (now - self.busy_mark) - (idle - self.idle_mark) / 1e9
        if busy > 0.0:
            self.stats.busy_seconds += busy
        self.busy_mark = now
        self.idle_mark = idle

    def on_beat(self) -> None:
        self.settle_busy()

    def _timed_fd_registration(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """What the hot path's Intercept falls back to for calls of another shape."""
        probe = self

        def register(fd: Any, callback: Any, *args: Any) -> Any:
            return original(fd, timed_io(callback, probe), *args)

        return register

    def _timed_protocols(self, original: Callable[..., Any]) -> Callable[..., Any]:
        probe = self

        async def create(protocol_factory: Any, *args: Any, **kwargs: Any) -> Any:
            def factory() -> Any:
                protocol = protocol_factory()
                if probe.active:
                    try:
                        instrument_protocol(protocol, probe)
                    except Exception as exc:
                        probe.installation.report_fault("timing a protocol", exc)
                return protocol

            return await original(factory, *args, **kwargs)

        return create

    def schedule_raw(
        self, loop: AbstractEventLoop, delay: float, callback: Callable[[], None]
    ) -> TimerHandle:
        # Once the hooks are removed, the loop's call_later is its own again.
        if self.raw_call_later is None:
            return loop.call_later(delay, callback)
        return self.raw_call_later(loop, delay, callback)
