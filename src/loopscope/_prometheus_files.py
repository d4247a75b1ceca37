"""prometheus_client's multiprocess mode: loopscope's figures where ``MultiProcessCollector``
looks for them.

An application in that mode (``PROMETHEUS_MULTIPROC_DIR`` set, a fresh ``CollectorRegistry``
with ``MultiProcessCollector`` built for each scrape, as the Django and gunicorn guides show)
never collects the registries of its processes: it reads the ``*.db`` files that every
process writes into that directory.  So, with the variable set, every process that installs
loopscope also writes its own figures there, once a second and at exit, in files of its own
(``counter_loopscope-<pid>.db``, ``histogram_...``, ``gauge_livesum_...``), through
prometheus_client's own file format (``prometheus_client.mmap_dict``).  Counters and
histograms are summed over every process that ever wrote, like the application's own;
gauges (tasks alive, executor workers) over live processes only: a process removes its
gauge files when it exits, and every writer removes those of processes that died without
doing so, so nothing depends on the application calling ``mark_process_dead``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from ._exit_hooks import at_exit
from ._multiprocess import WRITE_INTERVAL
from ._options import ConfigError
from ._processes import pid_alive

__all__ = ["ENV_VARIABLES", "PrometheusFiles", "directory_from_environment"]

#: The variable prometheus_client reads, and its deprecated lower-case spelling.
ENV_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
_TAG = "loopscope-"


def directory_from_environment() -> str | None:
    """The multiprocess directory prometheus_client is told to use, or None.  Raises
    :class:`ConfigError` when the variable is set to something that is not a writable
    directory (prometheus_client itself would fail on it too)."""
    for name in ENV_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            if not os.path.isdir(value) or not os.access(value, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"environment variable {name} (prometheus_client's multiprocess mode) "
                    f"must be the path of a writable directory; got {value!r}"
                )
            return os.path.abspath(value)
    return None


def _file_kind(family: Metric) -> str | None:
    """The file a family's samples go to, named as MultiProcessCollector reads it."""
    if family.type in ("counter", "histogram"):
        return family.type
    if family.type in ("gauge", "info"):
        # An info-style gauge is 1 in every process: the maximum, not the sum.
        return "gauge_livemax" if family.name.endswith("_info") else "gauge_livesum"
    return None


def _samples_to_write(family: Metric) -> Iterable[tuple[str, dict[str, str], float]]:
    """The samples as prometheus_client's own metrics store them: counters' ``_total``,
    histograms' buckets one by one (not cumulative) and ``_sum``; gauges as they are."""
    if family.type == "counter":
        for s in family.samples:
            if s.name.endswith("_total"):
                yield s.name, dict(s.labels), float(s.value)
        return
    if family.type != "histogram":
        for s in family.samples:
            yield s.name, dict(s.labels), float(s.value)
        return
    cumulative: dict[tuple[tuple[str, str], ...], list[tuple[float, str, float]]] = {}
    for s in family.samples:
        if s.name.endswith("_bucket"):
            rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            le = s.labels["le"]
            cumulative.setdefault(rest, []).append((float(le), le, float(s.value)))
        elif s.name.endswith("_sum"):
            yield s.name, dict(s.labels), float(s.value)
    for rest, buckets in cumulative.items():
        below = 0.0
        for _bound, le, count in sorted(buckets):
            yield family.name + "_bucket", {**dict(rest), "le": le}, count - below
            below = count


class PrometheusFiles:
    """This process's files in the multiprocess directory and the thread that writes them.

    ``collect`` gives this process's own families (its collector's, never a merged view);
    ``report_fault`` is the installation's."""

    def __init__(
        self,
        collect: Callable[[], Iterable[Metric]],
        directory: str,
        report_fault: Callable[[str, BaseException], None],
    ) -> None:
        self.collect = collect
        self.report_fault = report_fault
        self.directory = directory
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.files: dict[str, MmapedDict] = {}
        self.thread: threading.Thread | None = None

    @classmethod
    def start_from_environment(
        cls,
        collect: Callable[[], Iterable[Metric]],
        report_fault: Callable[[str, BaseException], None],
    ) -> PrometheusFiles | None:
        """Start writing when prometheus_client's multiprocess mode is on, else None."""
        directory = directory_from_environment()
        if directory is None:
            return None
        files = cls(collect, directory, report_fault)
        files.start(first_write_now=True)
        return files

    def for_forked_child(self) -> PrometheusFiles:
        """In a forked child: files of the child's own pid, written from one interval on;
        the parent's mappings (and its thread) stay the parent's."""
        self.files.clear()
        files = PrometheusFiles(self.collect, self.directory, self.report_fault)
        files.start(first_write_now=False)
        return files

    def start(self, *, first_write_now: bool) -> None:
        """Write now (or after one interval, in a forked child) and then every second."""
        if first_write_now:
            self.write()
        self.thread = threading.Thread(
            target=self._run, name="loopscope-prometheus-files", daemon=True
        )
        self.thread.start()
        at_exit(self.at_exit)

    def _run(self) -> None:
        while not self.stopped.wait(WRITE_INTERVAL):
            if os.getpid() != self.pid:
                return
            self.write()

    def _path(self, kind: str, pid: int | None = None) -> str:
        return os.path.join(self.directory, f"{kind}_{_TAG}{pid or self.pid}.db")

    def write(self) -> None:
        """Write this process's current figures; never raises."""
        try:
            families = list(self.collect())
            with self.lock:
                if self.stopped.is_set() and self.thread is not None:
                    return
                for family in families:
                    kind = _file_kind(family)
                    if kind is None:
                        continue
                    store = self.files.get(kind)
                    if store is None:
                        store = self.files[kind] = MmapedDict(self._path(kind))  # type: ignore[no-untyped-call]
                    for name, labels, value in _samples_to_write(family):
                        key = mmap_key(
                            family.name, name, list(labels), list(labels.values()),
                            family.documentation,
                        )  # fmt: skip
                        store.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
            self._remove_dead_gauges()
        except Exception as exc:
            self.report_fault("writing prometheus_client multiprocess files", exc)

    def _remove_dead_gauges(self) -> None:
        for name in os.listdir(self.directory):
            if not name.startswith("gauge_") or f"_{_TAG}" not in name:
                continue
            pid = name.rsplit(_TAG, 1)[1].removesuffix(".db")
            if pid.isdigit() and int(pid) != self.pid and not pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))

    def stop(self) -> None:
        """Last write, then remove this process's gauge files (its counters stay)."""
        if os.getpid() != self.pid or self.stopped.is_set():
            return
        self.write()
        with self.lock:
            self.stopped.set()
            for kind, store in self.files.items():
                with contextlib.suppress(Exception):
                    store.close()  # type: ignore[no-untyped-call]
                if kind.startswith("gauge"):
                    with contextlib.suppress(OSError):
                        os.unlink(self._path(kind))
            self.files.clear()

    def at_exit(self) -> None:
        """At interpreter exit: as :meth:`stop` (nothing once stopped, or in a forked child,
        which has files of its own)."""
        with contextlib.suppress(Exception):
            self.stop()
