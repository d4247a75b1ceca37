"""Several worker processes, one set of totals: snapshots merged through a shared directory.

With ``multiprocess_dir`` (``LOOPSCOPE_MULTIPROCESS_DIR``) set, every process that installs
loopscope writes what its own collector would export to ``loopscope-<pid>-<token>.json`` in
that directory: once a second from a daemon thread, at exit, and on every scrape it answers.
Whatever process answers a scrape (a gunicorn or uvicorn supervisor under ``loopscope run
--port``, or any worker through the app's own ``/metrics`` route) merges every file:

- counters and histograms are summed over every process that ever wrote a file, including
  workers that have died, so a dead worker's last figures stay and totals never go
  backwards when a worker is replaced;
- gauges (tasks alive, busy and maximum executor workers) are summed over the processes
  still alive only; ``*_info`` gauges take the maximum (they are 1 or absent);
- the files of dead processes are folded into ``loopscope-retired.json`` (under an
  ``flock``), so that worker churn does not grow the directory.

A process writes its file before it answers a scrape, so nothing ever exported is missing
from the directory if that process dies next.  The ``loop`` label keeps its meaning and
there is no per-process label: a fleet of workers whose loops are all named ``MainThread``
exports one ``MainThread`` series, the sum over the workers, with no series per pid that
worker churn would multiply.  The directory must be local to the machine and should be
emptied when the service (re)starts, as with prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ._processes import pid_alive

if TYPE_CHECKING:
    from ._collector import LoopCollector

__all__ = ["MergedCollector", "ProcessFiles", "merge_directory"]

PREFIX = "loopscope-"
RETIRED = "loopscope-retired.json"
LOCK = ".loopscope.lock"
#: Seconds between two writes of a process's files by its writer thread (here and in
#: ``_prometheus_files``).
WRITE_INTERVAL = 1.0

# A snapshot: family name -> {"type", "help", "samples": [[name, labels, value], ...]}.
Snapshot = dict[str, dict[str, Any]]


def _families_to_snapshot(families: Iterable[Metric]) -> Snapshot:
    out: Snapshot = {}
    for family in families:
        entry = out.setdefault(
            family.name, {"type": family.type, "help": family.documentation, "samples": []}
        )
        for s in family.samples:
            entry["samples"].append([s.name, dict(s.labels), float(s.value)])
    return out


def _write_json(path: str, payload: object) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, separators=(",", ":"))
    os.replace(tmp, path)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_gauge(entry: dict[str, Any]) -> bool:
    return entry.get("type") in ("gauge", "info", "stateset", "unknown")


class _Merger:
    """Sums snapshots sample by sample."""

    def __init__(self) -> None:
        self.meta: dict[str, tuple[str, str]] = {}
        self.values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

    def add(self, snapshot: Snapshot, *, alive: bool, cumulative_only: bool = False) -> None:
        for name, entry in snapshot.items():
            if not isinstance(entry, dict):
                continue
            gauge = _is_gauge(entry)
            if gauge and (cumulative_only or not alive):
                continue
            self.meta.setdefault(name, (str(entry.get("type")), str(entry.get("help", ""))))
            bucket = self.values.setdefault(name, {})
            use_max = gauge and name.endswith("_info")
            for sample_name, labels, value in entry.get("samples", []):
                key = (str(sample_name), tuple(sorted((str(k), str(v)) for k, v in labels.items())))
                if use_max:
                    bucket[key] = max(bucket.get(key, value), value)
                else:
                    bucket[key] = bucket.get(key, 0.0) + float(value)

    def snapshot(self) -> Snapshot:
        """The merged figures as a snapshot (what the retired file stores)."""
        out: Snapshot = {}
        for name, (typ, doc) in self.meta.items():
            out[name] = {
                "type": typ,
                "help": doc,
                "samples": [[s, dict(labels), v] for (s, labels), v in self.values[name].items()],
            }
        return out

    def families(self) -> Iterator[Metric]:
        for name, (typ, doc) in self.meta.items():
            family = Metric(name, doc, typ)
            for (sample_name, labels), value in sorted(self.values[name].items()):
                family.add_sample(sample_name, dict(labels), value)
            yield family


class ProcessFiles:
    """This process's file in the shared directory and the thread that keeps it current.

    ``collect`` gives this process's own families (its collector's, not the merged view);
    ``report_fault`` is the installation's.  The installation sets ``stopped`` when it is
    uninstalled, and makes a new object in a forked child."""

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
        self.path = os.path.join(directory, f"{PREFIX}{self.pid}-{uuid.uuid4().hex[:12]}.json")
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def start(self) -> None:
        """Write the file now and every :data:`WRITE_INTERVAL` seconds from now on."""
        self.write()
        threading.Thread(target=self._run, name="loopscope-multiprocess", daemon=True).start()

    def _run(self) -> None:
        while not self.stopped.wait(WRITE_INTERVAL):
            if os.getpid() != self.pid:
                return  # the copy of this object in a forked child
            self.write()

    def write(self) -> Snapshot:
        """Snapshot this process's figures, write them, and return them."""
        with self.lock:
            snapshot = _families_to_snapshot(self.collect())
            try:
                _write_json(self.path, {"pid": self.pid, "families": snapshot})
            except OSError as exc:
                if not os.path.isdir(self.directory):
                    # Retired with the command that owned it (``loopscope run`` removes its
                    # directory once the command ends; a worker can outlive it by a moment):
                    # nobody reads it any more, so there is nothing to write, nor to report.
                    self.stopped.set()
                else:
                    self.report_fault("writing the multiprocess file", exc)
            return snapshot

    def at_exit(self) -> None:
        """Last write when the interpreter exits normally, if still installed."""
        if os.getpid() == self.pid and not self.stopped.is_set():
            self.stopped.set()
            with contextlib.suppress(Exception):
                self.write()


def merge_directory(directory: str, own: tuple[str, Snapshot] | None = None) -> _Merger:
    """Merge every process file of ``directory`` (``own``: this process's path and its
    fresh snapshot, used instead of reading it back), folding dead processes' files into
    the retired file."""
    merger = _Merger()
    lock_path = os.path.join(directory, LOCK)
    with open(lock_path, "a+b") as lock_file:
        _flock(lock_file)
        try:
            retired_data = _read_json(os.path.join(directory, RETIRED)) or {}
            retired: Snapshot = retired_data.get("families", {})
            absorbed: set[str] = set(retired_data.get("absorbed", []))
            merger.add(retired, alive=False, cumulative_only=True)
            dead: list[tuple[str, Snapshot]] = []
            for entry in sorted(os.listdir(directory)):
                if not entry.startswith(PREFIX) or not entry.endswith(".json"):
                    continue
                if entry == RETIRED or entry in absorbed:
                    continue
                path = os.path.join(directory, entry)
                if own is not None and path == own[0]:
                    merger.add(own[1], alive=True)
                    continue
                data = _read_json(path)
                if data is None:
                    continue
                pid = data.get("pid")
                families = data.get("families", {})
                alive = isinstance(pid, int) and pid_alive(pid)
                merger.add(families, alive=alive)
                if not alive:
                    dead.append((entry, families))
            if dead:
                _retire(directory, retired, absorbed, dead)
        finally:
            _funlock(lock_file)
    return merger


def _retire(
    directory: str, retired: Snapshot, absorbed: set[str], dead: list[tuple[str, Snapshot]]
) -> None:
    """Fold dead processes' counters into the retired file, then remove their files.  The
    retired file names what it absorbed, so a crash between the two steps counts nothing
    twice."""
    folded = _Merger()
    folded.add(retired, alive=False, cumulative_only=True)
    for _entry, families in dead:
        folded.add(families, alive=False, cumulative_only=True)
    still_there = {name for name in absorbed if os.path.exists(os.path.join(directory, name))}
    names = still_there | {entry for entry, _ in dead}
    try:
        _write_json(
            os.path.join(directory, RETIRED),
            {"families": folded.snapshot(), "absorbed": sorted(names)},
        )
    except OSError:
        return
    for entry, _ in dead:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, entry))


def _flock(fh: Any) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)


def _funlock(fh: Any) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class MergedCollector(Collector):
    """Registered in place of the installation's collector: the merged figures of every
    process writing to the shared directory."""

    def __init__(self, local: LoopCollector, files: ProcessFiles) -> None:
        self.local = local
        self.files = files

    def describe(self) -> Iterable[Metric]:
        return list(self.local.describe())

    def collect(self) -> Iterable[Metric]:
        files = self.files
        try:
            own = files.write()
            merger = merge_directory(files.directory, (files.path, own))
            return list(merger.families())
        except Exception as exc:
            files.report_fault("merging the multiprocess directory", exc)
            return []
