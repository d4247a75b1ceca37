"""Several worker processes, one ``port`` setting: the first process binds it, the others join.

``uvicorn --workers 4`` and ``gunicorn -w 4`` start every worker with the same environment,
so every worker asks for the same ``/metrics`` port.  The first one binds it and becomes the
*host*; it leaves a claim file naming itself and its parent.  A later worker whose bind
fails reads the claim: when the host is its sibling (the same parent: the uvicorn
supervisor or the gunicorn arbiter) or its parent (a host that forked its workers), the
worker does not fail but joins the host's group: it writes its figures into the group's
shared directory (``multiprocess_dir`` when one is set, else a directory made here), and
the host, which looks for that directory before it builds each exposition, merges them.
A port held by any other process is still an error.

Claims and group directories live in a directory private to the user (mode 0700) under the
temporary directory.  Nothing here runs per step: only at install, at a failed bind, and
(a ``stat``) before each build of the exposition.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass

from ._processes import pid_alive

__all__ = ["Claim", "JoinRefused", "base_directory", "claim", "find_group_directory", "join"]

#: How long a worker whose bind failed waits for the holder's claim to appear (the holder
#: writes it right after its bind, so only a near tie waits).
CLAIM_WAIT = 1.0
_POLL = 0.02


class JoinRefused(Exception):
    """The port is held by a process that is not of this worker's service."""


def base_directory() -> str:
    """The user's private directory of claims and group directories, made if missing.

    Raises OSError when it exists but is not a directory owned by this user and closed
    to others (someone else could otherwise steer the figures)."""
    path = _base_path()
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if (
        not stat.S_ISDIR(info.st_mode)
        or (hasattr(os, "getuid") and info.st_uid != os.getuid())
        or info.st_mode & 0o077
    ):
        raise OSError(errno.EPERM, f"{path} is not a private directory of this user")
    return path


def _base_path() -> str:
    return os.path.join(tempfile.gettempdir(), f".loopscope-{_uid()}")


def _make_group_directory(group: int, addr: str, port: int) -> str:
    """The directory of the workers whose group is named after process ``group``, made if
    missing."""
    path = os.path.join(base_directory(), _group_name(group, addr, port))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    return path


def _uid() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else "user"


def _endpoint_name(addr: str, port: int) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", addr) + f"-{port}"


def _group_name(group: int, addr: str, port: int) -> str:
    return f"group-{group}-{_endpoint_name(addr, port)}.d"


@dataclass
class Claim:
    """What the host of a port wrote: itself, its parent, and a shared directory if it had
    one configured."""

    path: str
    pid: int
    ppid: int
    directory: str | None

    def release(self) -> None:
        """Remove the claim file if it is still this process's (at exit or uninstall)."""
        if os.getpid() != self.pid:
            return  # a forked child inherited the hook; the claim is its parent's
        with contextlib.suppress(OSError, ValueError):
            with open(self.path, encoding="utf-8") as fh:
                if json.load(fh).get("pid") != self.pid:
                    return
            os.unlink(self.path)


def claim(addr: str, port: int, directory: str | None) -> Claim | None:
    """Record that this process serves ``addr:port`` (after a successful bind), and remove
    what dead hosts left behind.  None when nothing can be written (then nobody can join)."""
    try:
        base = base_directory()
        _prune(base)
        path = os.path.join(base, _endpoint_name(addr, port) + ".json")
        record = Claim(path, os.getpid(), os.getppid(), directory)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"pid": record.pid, "ppid": record.ppid, "directory": directory}, fh)
        os.replace(tmp, path)
        return record
    except OSError:
        return None


def _prune(base: str) -> None:
    """Remove claims and group directories whose process has died."""
    for name in os.listdir(base):
        full = os.path.join(base, name)
        if name.startswith("group-") and name.endswith(".d"):
            pid = name.split("-")[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(full, ignore_errors=True)
        elif name.endswith(".json"):
            try:
                with open(full, encoding="utf-8") as fh:
                    pid = json.load(fh).get("pid")
            except (OSError, ValueError):
                continue
            if not isinstance(pid, int) or not pid_alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(full)


def _read_claim(addr: str, port: int) -> Claim | None:
    try:
        path = os.path.join(base_directory(), _endpoint_name(addr, port) + ".json")
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    pid, ppid, directory = data.get("pid"), data.get("ppid"), data.get("directory")
    if not isinstance(pid, int) or not isinstance(ppid, int):
        return None
    if directory is not None and not isinstance(directory, str):
        return None
    return Claim(path, pid, ppid, directory)


def join(addr: str, port: int) -> str:
    """The shared directory through which this process's figures reach the host of
    ``addr:port``, made if needed.  Raises :class:`JoinRefused` when the port's holder is
    not this process's sibling or parent (or left no claim within :data:`CLAIM_WAIT`)."""
    me, parent = os.getpid(), os.getppid()
    deadline = time.monotonic() + CLAIM_WAIT
    while True:
        host = _read_claim(addr, port)
        if host is not None and host.pid != me and pid_alive(host.pid):
            if host.pid == parent or host.ppid == parent:
                break
            raise JoinRefused(f"process {host.pid}, which is not a worker of this service")
        if time.monotonic() >= deadline:
            raise JoinRefused("another program")
        time.sleep(_POLL)
    if host.directory:
        return host.directory
    return _make_group_directory(host.pid if host.pid == parent else parent, addr, port)


def find_group_directory(addr: str, port: int) -> str | None:
    """For the host: the directory its workers joined through, once one exists (workers
    forked by the host use a group named after it; its siblings, one named after their
    common parent)."""
    for group in (os.getpid(), os.getppid()):
        path = os.path.join(_base_path(), _group_name(group, addr, port))
        if os.path.isdir(path):
            return path
    return None


def group_directory_for_child(addr: str, port: int) -> str:
    """For a worker forked by the host: its group's directory, made if missing."""
    return _make_group_directory(os.getppid(), addr, port)
