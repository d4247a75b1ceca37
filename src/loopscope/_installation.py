"""install() and uninstall(): the one process-wide installation and everything it patched.

Every loop created while loopscope is installed is instrumented from its constructor
(``asyncio.BaseEventLoop.__init__`` and ``uvloop.Loop.__init__`` are wrapped), which covers
``asyncio.run()``, ``asyncio.Runner``, ``asyncio.new_event_loop()``, ``uvloop.run()`` and
``uvloop.new_event_loop()`` without relying on event-loop policies, deprecated in 3.14.

The installation owns everything loopscope keeps per process (the probes, the loops' book,
the executor book, the watchdog, the endpoint, the shared and multiprocess files) and hands
the pieces below it only what they need.  It also owns the one fork handler
(:func:`_after_fork_in_child`), which sets a forked child up in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from prometheus_client.registry import Collector, CollectorRegistry

from . import _port_sharing
from ._asyncio_hooks import AsyncioProbe
from ._collector import LoopCollector
from ._event_logs import LogOutput, log_notice
from ._event_ring import EventRing
from ._events import EventDispatch
from ._executor import ExecutorBook, hook_loop
from ._exit_hooks import at_exit
from ._gilreader import Capture
from ._infrastructure import created_by_server_infrastructure
from ._instrument import Instrument
from ._log import logger
from ._multiprocess import MergedCollector, ProcessFiles
from ._options import ConfigError, Options, conflicting_options, resolve_options
from ._probe import LoopProbe
from ._prometheus_files import PrometheusFiles, directory_from_environment
from ._server import MetricsServer
from ._stats import LoopStats, SeriesBook
from ._watchdog import Watchdog

if TYPE_CHECKING:
    from ._otel import OtelExport

__all__ = ["Installation", "current", "install", "instrument", "uninstall"]


_lock = threading.RLock()
_current: Installation | None = None
_MISSING = object()
#: Errors of bind() that mean the address is wrong rather than the port.
_ADDRESS_ERRNOS = frozenset(
    {errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL, getattr(errno, "EAI_NONAME", -1)}
)
#: Seconds a fork waits for an exposition the endpoint is building to be done.
FORK_BUILD_WAIT = 1.0

#: What an installation runs on each loop it instruments, after the probe's own patches:
#: ``hook(probe, loop)`` (see ``LoopProbe.patch_lifecycle``).
LoopHook = Callable[[LoopProbe, asyncio.AbstractEventLoop], None]


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
        self.executor_book = ExecutorBook(options.max_executor_labels)
        #: loopscope's own log of the events (option ``events``), an instrument like any.
        self.log_output: LogOutput | None = None
        if options.events != "off":
            self.log_output = LogOutput(options.events, options.log_stack, options.import_events)
        #: The recent events served on /loopscope/events (option ``events_endpoint``).
        self.event_ring: EventRing | None = None
        if options.events_endpoint and options.port is not None:
            self.event_ring = EventRing()
        builtin = tuple(x for x in (self.log_output, self.event_ring) if x is not None)
        self.events = EventDispatch((*builtin, *options.instruments))
        #: Run on every loop instrumented (``LoopProbe.patch_lifecycle``).
        self.loop_hooks: tuple[LoopHook, ...] = (
            functools.partial(hook_loop, self.executor_book, self.report_fault),
        )
        #: This process's own figures; ``exported`` is what the registry holds: this
        #: collector, or the merged view of a shared directory around it.
        self.collector = LoopCollector(
            self.book, self.executor_book, self.live_probes, self.report_fault
        )
        self.exported: Collector = self.collector
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
        #: This process's file in a shared directory (``multiprocess_dir``, or the group
        #: of the workers sharing a port), once the figures are merged through one.
        self.shared_files: ProcessFiles | None = None
        self._share_lock = threading.Lock()
        #: The figures written for prometheus_client's multiprocess mode, when it is on.
        self.prometheus_files: PrometheusFiles | None = None
        #: loopscope's OpenTelemetry instruments, once export to OpenTelemetry is on.
        self.otel: OtelExport | None = None

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
        if shared_directory:
            # Worker processes merge their figures through a shared directory.
            self.share_figures(shared_directory)
        self.prometheus_files = PrometheusFiles.start_from_environment(
            self.collector.collect, self.report_fault
        )
        if self.options.otel is not False:
            try:
                self.export_to_otel(None if self.options.otel is True else self.options.otel)
            except Exception as exc:
                self.report_fault("starting the OpenTelemetry export", exc)

    def export_to_otel(self, meter_provider: Any = None) -> None:
        """Also export this process's figures as OpenTelemetry instruments on
        ``meter_provider`` (default: the global one).  Once: a later call does nothing.
        Needs ``opentelemetry-api`` (and ``opentelemetry-sdk`` for the histograms)."""
        if self.otel is not None:
            return
        from ._otel import export_to

        self.otel = export_to(meter_provider, self.collector.read, self.report_fault)

    def stop_otel_export(self) -> None:
        """Stop reporting figures to OpenTelemetry (the instruments stay on their meter, as
        the OpenTelemetry API has no way to remove them, but report nothing)."""
        if self.otel is not None:
            self.otel.stop()
            self.otel = None

    def share_figures(self, directory: str | None = None) -> ProcessFiles | None:
        """Merge this process's figures with those of the other processes writing to
        ``directory`` (else the ``multiprocess_dir`` option): write them there and export
        the merged view.  Once per process; None when there is no directory."""
        directory = directory or self.options.multiprocess_dir
        if not directory:
            return None
        with self._share_lock:
            files = self.shared_files
            if files is not None and files.pid == os.getpid():
                return files
            files = ProcessFiles(self.collector.collect, directory, self.report_fault)
            self._export(MergedCollector(self.collector, files))
            self.shared_files = files
            files.start()
            at_exit(files.at_exit)
            return files

    def _export(self, collector: Collector) -> None:
        """Register ``collector`` in place of what the registry holds of loopscope's."""
        registry = self.options.registry
        with contextlib.suppress(KeyError):
            registry.unregister(self.exported)
        registry.register(collector)
        self.exported = collector

    def _serve(self, registry: CollectorRegistry) -> str | None:
        """Start the endpoint; or, when a sibling or parent process of the same service
        already serves the port, return the directory through which to join it."""
        addr, port = self.options.addr, self.options.port
        assert port is not None
        try:
            ring = self.event_ring
            self.server = MetricsServer(
                addr,
                port,
                registry,
                self.options,
                before_build=self._before_build,
                events=ring.json if ring is not None else None,
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
                self._joined = self.share_figures(directory) is not None
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
            self.options.registry.unregister(self.exported)
        if self.shared_files is not None:
            self.shared_files.stopped.set()  # its thread ends; no last write
        if self.prometheus_files is not None:
            self.prometheus_files.stop()
            self.prometheus_files = None
        self.stop_otel_export()
        if self.release_claim is not None:
            self.release_claim()
            self.release_claim = None
        if self.server is not None:
            self.server.close()
            self.server = None

    # --- instruments ---------------------------------------------------------------------

    def add_instrument(self, instrument: Instrument) -> None:
        """Call ``instrument``'s hooks for every event from now on (see
        :class:`loopscope.Instrument`).  Adding one already there does nothing."""
        if not isinstance(instrument, Instrument):
            raise TypeError(
                f"add_instrument() takes a loopscope.Instrument; {instrument!r} is not one "
                "(subclass loopscope.Instrument)"
            )
        self.events.add(instrument)

    def remove_instrument(self, instrument: Instrument) -> None:
        """Stop calling ``instrument``.  Raises ValueError if it is not an instrument of
        this installation (never added, already removed, or removed after it raised)."""
        if not self.events.remove(instrument):
            raise ValueError(f"{instrument!r} is not an instrument of this installation")

    @property
    def instruments(self) -> tuple[Instrument, ...]:
        """The instruments receiving events now, loopscope's own (its log output and its ring
        of recent events) first."""
        return self.events.instruments

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

    def report_block_later(
        self, probe: LoopProbe, capture: Capture, callback: object, task: object
    ) -> None:
        """A block the GIL reader saw in a step that ended before the watchdog could
        report it: the watchdog reports it (``loop_blocked`` stays on its thread)."""
        self.watchdog.hand_over(probe, capture, callback, task)

    def report_fault(self, where: str, exc: BaseException) -> None:
        """Log a fault inside loopscope once per place; never raises."""
        try:
            if where in self._faults_reported:
                return
            self._faults_reported.add(where)
            logger().error(
                "loopscope: error while %s; that measurement is switched off and the "
                "application goes on",
                where,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        except Exception:
            pass

    # --- fork ----------------------------------------------------------------------------

    def before_fork(self) -> Callable[[], None] | None:
        """Before ``os.fork()``: wait for an exposition being built, so that no thread of
        this process holds the registry's lock in the child.  Returns what to call after
        the fork in the parent, if anything."""
        server = self.server
        if server is not None and server.hold_builds(FORK_BUILD_WAIT):
            return server.release_builds
        return None

    def after_fork_in_child(self) -> None:
        """Set a forked child up (gunicorn's workers, ``os.fork()``): every lock a thread of
        the parent may have held, the watchdog, and, when the parent served the port or
        shared a directory, the child's own file and figures; its own prometheus_client
        multiprocess files.  Threads did not survive the fork; the parent's files,
        endpoint and port claim stay the parent's."""
        self._probes_lock = threading.Lock()
        self._share_lock = threading.Lock()
        self.book.lock = threading.Lock()
        sharing = self.shared_files is not None or self.server is not None
        # The parent's figures are in the parent's file: a sharing child starts from zero.
        self.executor_book.after_fork_in_child(keep_figures=not sharing)
        if not self.watchdog.stopped.is_set():
            self.watchdog.start()
        try:
            if self.shared_files is not None:
                self._share_from_forked_child(self.shared_files)
            elif self.server is not None:
                self._join_forking_host(self.server)
        except Exception as exc:
            self.report_fault("setting up a forked worker", exc)
        if self.prometheus_files is not None:
            self.prometheus_files = self.prometheus_files.for_forked_child()

    def _share_from_forked_child(self, inherited: ProcessFiles) -> None:
        """A worker forked by a process that merges through a shared directory: a file of
        its own in the same directory, figures from zero, no endpoint."""
        inherited.stopped.set()
        if self.server is not None:
            self.server.close_in_forked_child()
            self.server = None
        try:
            self._reset_figures()
        except Exception as exc:
            self.report_fault("resetting a forked worker's figures", exc)
        files = ProcessFiles(inherited.collect, inherited.directory, self.report_fault)
        if isinstance(self.exported, MergedCollector):
            self.exported.files = files
        self.shared_files = files
        files.start()
        at_exit(files.at_exit)

    def _join_forking_host(self, server: MetricsServer) -> None:
        """A worker forked by the process that serves the port (``gunicorn --preload`` with
        ``install(port=...)`` at import): it does not serve, it sends its figures to the
        parent through their group's directory, which the parent merges from its next
        scrape on."""
        self.server = None
        server.close_in_forked_child()
        self.release_claim = None  # the claim is the parent's
        try:
            self._reset_figures()
            directory = _port_sharing.group_directory_for_child(server.addr, server.port)
        except Exception as exc:
            self.report_fault("joining the parent's /metrics endpoint", exc)
            return
        self.share_figures(directory)

    def _reset_figures(self) -> None:
        """A child whose parent's figures are in the parent's file starts from zero; the
        loops alive at the fork count into fresh figures."""
        book = self.book
        with book.locked():
            for series in book.series.values():
                series.retired = LoopStats()
                for key in list(series.live):
                    series.live[key] = LoopStats()
        for probe in self.live_probes():
            owner = book.series.get(probe.label)
            if owner is not None and probe.key in owner.live:
                stats = owner.live[probe.key]
                if probe.recorder is not None:
                    # The recorder still holds figures of the parent's not yet flushed:
                    # drop them, then let it flush into the child's fresh figures.
                    probe.recorder.flush(LoopStats())
                    stats.pending = probe.recorder
                probe.stats = stats


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
    ``loop_name`` (the ``loop`` label; default the loop thread's name), ``events`` (where
    slow steps are logged; default ``auto``), ``instruments`` (:class:`loopscope.Instrument`
    objects that receive every event), ``max_loop_labels`` (default 50), ``registry``
    (default prometheus_client's ``REGISTRY``) and more: see the README's option table.

    Calling it again is harmless: the first configuration stays (instruments given again
    are added), and a running loop that is not yet instrumented is instrumented.  Raises
    :class:`ConfigError` for a bad option, leaving nothing installed.
    """
    global _current
    resolved = resolve_options(options)
    with _lock:
        installation = _current
        if installation is None:
            installation = Installation(resolved)
            installation.start()
            _current = installation
        else:
            if conflicts := conflicting_options(installation.options, options):
                log_notice(
                    installation.options.events,
                    "loopscope_already_installed",
                    "install() was called again with other options; the first ones stay",
                    options=conflicts,
                )
            for instrument in resolved.instruments:
                installation.add_instrument(instrument)
            if resolved.otel is not False and installation.otel is None:
                # Like instruments, OpenTelemetry export can be added to a running installation.
                installation.export_to_otel(None if resolved.otel is True else resolved.otel)
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


def _before_fork() -> None:
    global _release_after_fork
    installation = _current
    _release_after_fork = installation.before_fork() if installation is not None else None


def _after_fork_in_parent() -> None:
    global _release_after_fork
    release, _release_after_fork = _release_after_fork, None
    if release is not None:
        release()


def _after_fork_in_child() -> None:
    """The one fork handler: a forked child of an installed process sets itself up."""
    global _lock, _release_after_fork
    _lock = threading.RLock()
    _release_after_fork = None  # the endpoint's thread stayed in the parent
    installation = _current
    if installation is not None:
        installation.after_fork_in_child()


#: What to call in the parent once a fork is done (see Installation.before_fork).
_release_after_fork: Callable[[], None] | None = None
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def uninstall() -> None:
    """Undo install(): restore constructors, take the hooks off every loop, unregister the
    collector and stop the endpoint.  Harmless when nothing is installed."""
    global _current
    with _lock:
        installation, _current = _current, None
        if installation is not None:
            installation.stop()
