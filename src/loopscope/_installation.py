"""install() and uninstall(): the one process-wide installation and everything it patched.

Every loop created while loopscope is installed is instrumented from its constructor
(``asyncio.BaseEventLoop.__init__`` and ``uvloop.Loop.__init__`` are wrapped), which covers
``asyncio.run()``, ``asyncio.Runner``, ``asyncio.new_event_loop()``, ``uvloop.run()`` and
``uvloop.new_event_loop()`` without relying on event-loop policies, deprecated in 3.14.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

from prometheus_client.registry import CollectorRegistry

from . import _port_sharing
from ._asyncio_hooks import AsyncioProbe
from ._collector import LoopCollector
from ._events import SlowEventLog
from ._exit_hooks import at_exit
from ._infrastructure import created_by_server_infrastructure
from ._multiprocess import register_fork_hook
from ._options import ConfigError, Options, conflicting_options, resolve_options
from ._probe import LoopProbe
from ._prometheus_files import PrometheusFiles, directory_from_environment
from ._server import MetricsServer
from ._stats import SeriesBook
from ._watchdog import Watchdog, register_for_fork

__all__ = ["Installation", "current", "install", "instrument", "uninstall"]

_fallback = logging.getLogger("loopscope")
_lock = threading.RLock()
_current: Installation | None = None
_MISSING = object()
#: Errors of bind() that mean the address is wrong rather than the port.
_ADDRESS_ERRNOS = frozenset(
    {errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL, getattr(errno, "EAI_NONAME", -1)}
)


def uvloop_loop_class() -> type[Any] | None:
    """``uvloop.Loop`` if uvloop can be imported, else None."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.Loop


def probe_class_for(loop: object) -> type[LoopProbe] | None:
    """The probe that knows how to instrument ``loop``, or None for an unknown loop."""
    uvloop_class = uvloop_loop_class()
    if uvloop_class is not None and isinstance(loop, uvloop_class):
        from ._uvloop_hooks import UvloopProbe

        return UvloopProbe
    if isinstance(loop, asyncio.BaseEventLoop):
        return AsyncioProbe
    return None


class Installation:
    """What one install() set up.  Also a context manager that uninstalls on exit."""

    def __init__(self, options: Options, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.clock = clock
        self.book = SeriesBook(options.max_loop_labels, options.max_locations)
        self.events = SlowEventLog(options.slow_events)
        self.collector = LoopCollector(self)
        self.server: MetricsServer | None = None
        self.watchdog = Watchdog(self)
        self.constructors_patched = False
        self._probes: weakref.WeakKeyDictionary[Any, LoopProbe] = weakref.WeakKeyDictionary()
        self._probes_lock = threading.Lock()
        self._patched: list[tuple[type[Any], object]] = []
        self._faults_reported: set[str] = set()
        #: Removes this process's claim on its port (see _port_sharing), while it has one.
        self.release_claim: Callable[[], None] | None = None
        self._joined = False
        #: The figures written for prometheus_client's multiprocess mode, when it is on.
        self.prometheus_files: PrometheusFiles | None = None

    # --- starting and stopping -----------------------------------------------------------

    def start(self) -> None:
        """Register the collector and start the endpoint; all or nothing."""
        directory_from_environment()  # a bad PROMETHEUS_MULTIPROC_DIR fails before anything
        registry = self.options.registry
        try:
            registry.register(self.collector)
        except ValueError as exc:
            raise ConfigError(
                f"option registry: the registry already has metrics loopscope exports ({exc})"
            ) from None
        shared_directory = self.options.multiprocess_dir
        if self.options.port is not None:
            try:
                shared_directory = self._serve(registry) or shared_directory
            except BaseException:
                registry.unregister(self.collector)
                raise
        self.watchdog.start()
        register_for_fork(self.watchdog)
        if shared_directory:
            # Worker processes merge their figures through a shared directory.
            from ._multiprocess import attach

            attach(self, shared_directory)
        self.prometheus_files = PrometheusFiles.start_from_environment(self)

    def _serve(self, registry: CollectorRegistry) -> str | None:
        """Start the endpoint; or, when a sibling or parent process of the same service
        already serves the port, return the directory through which to join it."""
        addr, port = self.options.addr, self.options.port
        assert port is not None
        try:
            self.server = MetricsServer(
                addr, port, registry, self.options, before_build=self._before_build
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and port != 0:
                try:
                    return _port_sharing.join(addr, port)
                except (_port_sharing.JoinRefused, OSError) as refused:
                    raise ConfigError(
                        f"option port: cannot serve /metrics on {addr}:{port}: the port is "
                        f"in use by {refused}; choose a free port from 0 to 65535 (0 picks "
                        "one) or another addr"
                    ) from None
            if isinstance(exc, socket.gaierror) or exc.errno in _ADDRESS_ERRNOS:
                raise ConfigError(
                    f"option addr: cannot serve /metrics on {addr!r} "
                    f"({exc.strerror or exc}); give an IP address or host name of this "
                    "machine, such as '127.0.0.1' or '0.0.0.0'"
                ) from None
            raise ConfigError(
                f"option port: cannot serve /metrics on {addr}:{port} "
                f"({exc.strerror or exc}); choose a free port from 0 to 65535 (0 picks "
                "one) or another addr"
            ) from None
        register_fork_hook()  # a worker forked from here joins instead of serving
        record = _port_sharing.claim(addr, self.server.port, self.options.multiprocess_dir)
        if record is not None:
            self.release_claim = record.release
            at_exit(self._release_claim_at_exit)
        return None

    def _before_build(self) -> None:
        """Before each exposition the endpoint builds: merge the workers that joined."""
        if self.options.multiprocess_dir or self.server is None or self._joined:
            return
        try:
            directory = _port_sharing.find_group_directory(self.server.addr, self.server.port)
            if directory is not None:
                from ._multiprocess import attach

                self._joined = attach(self, directory) is not None
        except Exception as exc:
            self._joined = True  # not tried again
            self.report_fault("merging the workers that joined the /metrics endpoint", exc)

    def _release_claim_at_exit(self) -> None:
        release = self.release_claim
        if release is not None and _current is self:
            release()

    def patch_constructors(self) -> None:
        """Instrument every loop created from now on."""
        if self.constructors_patched:
            return
        classes: list[type[Any]] = [asyncio.BaseEventLoop]
        uvloop_class = uvloop_loop_class()
        if uvloop_class is not None:
            classes.append(uvloop_class)
        for cls in classes:
            previous = cls.__dict__.get("__init__", _MISSING)
            self._patched.append((cls, previous))
            cls.__init__ = self._wrap_init(cls.__init__)
        self.constructors_patched = True

    def _wrap_init(self, original: Callable[..., None]) -> Callable[..., None]:
        installation = self

        def __init__(loop: Any, *args: Any, **kwargs: Any) -> None:
            original(loop, *args, **kwargs)
            if not created_by_server_infrastructure():
                installation.instrument(loop)

        __init__.__wrapped__ = original  # type: ignore[attr-defined]
        return __init__

    def stop(self) -> None:
        """Restore everything start() and patch_constructors() changed."""
        for cls, previous in reversed(self._patched):
            if previous is _MISSING:
                if "__init__" in cls.__dict__:
                    delattr(cls, "__init__")
            else:
                cls.__init__ = previous
        self._patched.clear()
        self.constructors_patched = False
        self.watchdog.stop()
        for probe in self.live_probes():
            try:
                probe.remove()
            except Exception as exc:
                self.report_fault("removing instrumentation", exc)
        with contextlib.suppress(KeyError):
            self.options.registry.unregister(self.collector)
        if self.prometheus_files is not None:
            self.prometheus_files.stop()
            self.prometheus_files = None
        if self.release_claim is not None:
            self.release_claim()
            self.release_claim = None
        if self.server is not None:
            self.server.close()
            self.server = None

    def __enter__(self) -> Installation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with _lock:
            if _current is self:
                uninstall()

    @property
    def port(self) -> int | None:
        """The TCP port /metrics is served on, or None."""
        return self.server.port if self.server is not None else None

    # --- loops ---------------------------------------------------------------------------

    def instrument(self, loop: Any) -> LoopProbe | None:
        """Instrument ``loop`` (once); None if it is a kind of loop loopscope does not know."""
        try:
            with self._probes_lock:
                probe = self._probes.get(loop)
                if probe is not None:
                    return probe
                probe_class = probe_class_for(loop)
                if probe_class is None or loop.is_closed():
                    return None
                probe = probe_class(loop, self)
                self._probes[loop] = probe
            probe.install_hooks(loop)
            self.watchdog.wake()  # it watches the new loop from now on
            running = _running_loop()
            if running is not None and running is loop:
                # install() from inside a running loop: start measuring right away.
                probe.on_run_start(running)
            return probe
        except Exception as exc:
            self.report_fault("instrumenting a loop", exc)
            return None

    def live_probes(self) -> list[LoopProbe]:
        """The probes of loops that are still instrumented."""
        with self._probes_lock:
            return list(self._probes.values())

    def probe_for(self, loop: Any) -> LoopProbe | None:
        """The probe of ``loop``, if it is instrumented."""
        with self._probes_lock:
            return self._probes.get(loop)

    def forget(self, probe: LoopProbe) -> None:
        """Drop a probe whose loop closed, was collected or was uninstrumented."""
        loop = probe.loop_ref()
        if loop is None:
            return  # the weak dictionary already dropped it
        with self._probes_lock:
            if self._probes.get(loop) is probe:
                del self._probes[loop]

    def report_fault(self, where: str, exc: BaseException) -> None:
        """Log a fault inside loopscope once per place; never raises."""
        try:
            if where in self._faults_reported:
                return
            self._faults_reported.add(where)
            _fallback.error(
                "loopscope: error while %s; that measurement is switched off and the "
                "application goes on",
                where,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        except Exception:
            pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def current() -> Installation | None:
    """The active installation, if any."""
    return _current


def install(**options: Any) -> Installation:
    """Instrument every event loop of the process, and the running one if there is one.

    Options (keyword arguments or ``LOOPSCOPE_*`` variables; keywords win):
    ``slow_threshold`` (seconds, default 0.1), ``lag_interval`` (seconds, default 0.01),
    ``port`` (serve /metrics; default: no server), ``addr`` (default ``127.0.0.1``),
    ``loop_name`` (the ``loop`` label; default the loop thread's name), ``slow_events``
    (default true), ``max_loop_labels`` (default 50) and ``registry`` (default
    prometheus_client's ``REGISTRY``).

    Calling it again is harmless: the first configuration stays, and a running loop that
    is not yet instrumented is instrumented.  Raises :class:`ConfigError` for a bad option,
    leaving nothing installed.
    """
    global _current
    resolved = resolve_options(options)
    with _lock:
        installation = _current
        if installation is None:
            installation = Installation(resolved)
            installation.start()
            _current = installation
        elif conflicts := conflicting_options(installation.options, options):
            installation.events.logger.warning(
                "loopscope_already_installed",
                detail="install() was called again with other options; the first ones stay",
                options=conflicts,
            )
        installation.patch_constructors()
        loop = _running_loop()
        if loop is not None:
            installation.instrument(loop)
        return installation


def ensure_installed() -> Installation:
    """The active installation, or one made from ``LOOPSCOPE_*`` variables without patching
    constructors (used by the explicit loop factories)."""
    global _current
    with _lock:
        if _current is None:
            installation = Installation(resolve_options({}))
            installation.start()
            _current = installation
        return _current


def instrument(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    """Instrument one loop explicitly and return it."""
    ensure_installed().instrument(loop)
    return loop


def uninstall() -> None:
    """Undo install(): restore constructors, take the hooks off every loop, unregister the
    collector and stop the endpoint.  Harmless when nothing is installed."""
    global _current
    with _lock:
        installation, _current = _current, None
        if installation is not None:
            installation.stop()
