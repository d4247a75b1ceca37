"""``loopscope run [options] -- COMMAND ARGS...``: instrument a Python command without changing it.

The launcher turns its flags into ``LOOPSCOPE_*`` variables and validates them with those
already set (a bad value is reported before anything starts, naming the flag or variable it
came from; a ``--port`` that cannot be bound too), prepends the directory of loopscope's
``sitecustomize`` module to ``PYTHONPATH``, sets ``LOOPSCOPE_RUN=1`` and
``LOOPSCOPE_RUN_OWNER`` (its own process id) and replaces itself with the command
(``exec``: same process id, signals go straight to the command).  Every Python interpreter
started with that environment (the command, and the worker processes it forks or spawns)
imports ``sitecustomize`` at start-up, before the application's code, and :func:`bootstrap`
calls ``loopscope.install()`` there.

Several processes share one set of totals through ``multiprocess_dir``: unless one is given,
the launcher of a Python command creates a temporary directory.  It is removed once the
command has ended, however it ended (normally, by a signal, even ``SIGKILL``), by a small
*remover* process the launcher starts before the ``exec``: the remover is detached (its own
session, not a child of the command, no descriptor of the command's, SIGINT/SIGTERM/SIGHUP
ignored), waits on a pidfd of the command (or polls it where there is none), removes the
directory and exits.  The command itself is left exactly as it would be: no signal
handler, no extra child, no extra descriptor.  Only where no remover can be started does the
command remove the directory at its normal exit (``LOOPSCOPE_RUN_TMPDIR``).

The ``/metrics`` port, when asked for, is served by the command itself (a gunicorn master,
a uvicorn supervisor), with the merged figures of every process: when the command cannot
serve it, it says so in one line and runs uninstrumented.  Its other Python processes skip
the port quietly.

A process that cannot be instrumented prints one line on stderr and runs unchanged: one
whose variables are bad, and the command itself when its interpreter cannot import
loopscope (the other interpreters it starts that cannot import it start silently).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from ._options import OptionInfo

__all__ = ["SITE_DIR", "bootstrap", "build_environment", "is_python_program", "main"]

#: The directory holding loopscope's ``sitecustomize.py``.
SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sitecustomize")
RUN_FLAG = "LOOPSCOPE_RUN"
#: The process id of the command (the launcher's, which it keeps through the ``exec``).
OWNER_FLAG = "LOOPSCOPE_RUN_OWNER"
#: A temporary directory the command must remove at exit itself (no remover could start).
TMPDIR_FLAG = "LOOPSCOPE_RUN_TMPDIR"
_INTERNAL = (RUN_FLAG, OWNER_FLAG, TMPDIR_FLAG)

_PYTHON_NAME = re.compile(r"(python|pypy)[0-9.]*(\.exe)?\Z", re.IGNORECASE)
_REMOVER_ARG = "--remove-when-ended"
#: Characters read at most from a ``--...-file`` flag's file.
_SECRET_FILE_LIMIT = 4096

_USAGE = "loopscope run [options] -- COMMAND [ARGS...]"
_EPILOG = (
    "Options not given are read from the LOOPSCOPE_* variables named after them "
    "(--slow-threshold: LOOPSCOPE_SLOW_THRESHOLD); an option wins over its variable, and an "
    "empty variable counts as unset. The basic-auth password is read from a file "
    "(--basic-auth-password-file) or LOOPSCOPE_BASIC_AUTH_PASSWORD, never from the command "
    "line, which every user of the machine can see."
)


def _flag_table() -> list[OptionInfo]:
    from ._options import option_table

    return [info for info in option_table() if info.flag is not None]


def _help(info: OptionInfo) -> str:
    text = info.help
    if info.flag_reads_file:
        # A secret: a flag's value would show in the process list (see the epilog).
        text = f"file holding the {text}"
    elif info.default is not None:
        default = info.default
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopscope",
        description="Event-loop metrics for asyncio and uvloop applications.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND", title="commands")
    run = commands.add_parser(
        "run",
        help="run a Python command with loopscope installed in it and in its workers",
        description=(
            "Run COMMAND (python app.py, uvicorn app:app, gunicorn ..., python -m pkg) with "
            "loopscope.install() called at interpreter start-up in it and in every Python "
            "process it starts."
        ),
        usage=_USAGE,
        epilog=_EPILOG,
        allow_abbrev=False,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for info in _flag_table():
        assert info.flag is not None
        group = groups.get(info.group)
        if group is None:
            group = groups[info.group] = run.add_argument_group(info.group)
        group.add_argument(info.flag, dest=info.name, metavar=info.metavar, help=_help(info))
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    from . import _report, _top

    _top.add_command(commands)
    _report.add_command(commands)
    return parser


def _read_secret(flag: str, path: str) -> str:
    """The value held by the file a ``--...-file`` flag names: its text, less one final
    line break."""
    from ._options import ConfigError

    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read(_SECRET_FILE_LIMIT)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path!r} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{flag}: {path!r} is not UTF-8 text") from None
    for ending in ("\r\n", "\n"):
        if text.endswith(ending):
            text = text[: -len(ending)]
            break
    if text.strip() == "":
        raise ConfigError(f"{flag}: {path!r} holds no value (it is empty or blank)")
    return text


def flag_values(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """The options given as flags: option -> (the flag, the value for its variable).
    Raises :class:`loopscope.ConfigError` for an empty value or an unreadable file."""
    from ._options import ConfigError

    given: dict[str, tuple[str, str]] = {}
    for info in _flag_table():
        assert info.flag is not None
        raw: str | None = getattr(args, info.name)
        if raw is None:
            continue
        if raw.strip() == "":
            raise ConfigError(f"{info.flag}: empty value; give a value or leave the option out")
        value = _read_secret(info.flag, raw) if info.flag_reads_file else raw
        given[info.name] = (info.flag, value)
    return given


def build_environment(
    flags: Mapping[str, tuple[str, str]], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for the command: the variables of the ``flags`` (option -> (flag,
    value), see :func:`flag_values`) over ``environ``, validated, with loopscope's
    ``sitecustomize`` first on ``PYTHONPATH``.  Raises :class:`loopscope.ConfigError`
    naming the flag or the variable of a bad value, or of a ``port`` that cannot be bound
    now.  Creates nothing."""
    from ._options import ConfigError, bind_error, env_name, resolve_options

    env = dict(os.environ if environ is None else environ)
    for name in _INTERNAL:
        env.pop(name, None)
    for option, (_flag, value) in flags.items():
        env[env_name(option)] = value
    labels = {option: flag for option, (flag, _value) in flags.items()}
    options = resolve_options({}, env, flags=labels)  # every value checked before the start
    if options.port:
        error = bind_error(options.addr, options.port)
        if error is not None:
            where = f"[{options.addr}]" if ":" in options.addr else options.addr
            label = labels.get("port", f"environment variable {env_name('port')}")
            advice = "choose another port, or 0 to pick a free one"
            if error.errno == errno.EADDRINUSE:
                advice = f"the port is in use; {advice}"
            raise ConfigError(
                f"{label}: cannot serve /metrics on {where}:{options.port} "
                f"({error.strerror or error}); {advice}"
            )
    env[RUN_FLAG] = "1"
    env[OWNER_FLAG] = str(os.getpid())
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != SITE_DIR]
    env["PYTHONPATH"] = os.pathsep.join([SITE_DIR, *paths])
    return env


def is_python_program(path: str) -> bool:
    """Whether ``path`` is a Python interpreter or a script run by one (``#!...python``)."""
    if _PYTHON_NAME.match(os.path.basename(path)):
        return True
    try:
        with open(path, "rb") as fh:
            first = fh.readline(512)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first.lower()


def _make_temporary_directory(env: dict[str, str]) -> str:
    """A new multiprocess directory for the command, set in ``env``, and the remover that
    removes it once the command has ended (or, failing that, the command removes it)."""
    from ._options import env_name

    directory = tempfile.mkdtemp(prefix="loopscope-")
    env[env_name("multiprocess_dir")] = directory
    if not _start_remover(directory):
        env[TMPDIR_FLAG] = directory
    return directory


def _run(args: argparse.Namespace) -> int:
    from ._options import ConfigError, env_name

    command: list[str] = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(f"loopscope run: no command given; usage: {_USAGE}", file=sys.stderr)
        return 2
    try:
        env = build_environment(flag_values(args))
    except ConfigError as exc:
        print(f"loopscope run: {exc}", file=sys.stderr)
        return 2
    executable = shutil.which(command[0])
    if executable is None:
        print(f"loopscope run: command not found: {command[0]}", file=sys.stderr)
        return 127
    python = is_python_program(executable)
    if not python:
        print(
            f"loopscope run: {command[0]} ({executable}) is not a Python program, so "
            "loopscope cannot instrument it; it runs unchanged, and only the Python "
            "processes it starts are instrumented",
            file=sys.stderr,
        )
    temporary = None
    if python and not env.get(env_name("multiprocess_dir"), "").strip():
        try:
            temporary = _make_temporary_directory(env)
        except OSError as exc:
            print(
                f"loopscope run: cannot create a temporary directory for the processes' "
                f"figures ({exc.strerror or exc}); give one with --multiprocess-dir",
                file=sys.stderr,
            )
            return 2
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(executable, command, env)
    except OSError as exc:
        print(f"loopscope run: cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        if temporary is not None and env.get(TMPDIR_FLAG) == temporary:
            _remove_directory(temporary)  # else the remover does, as this process ends
        return 126
    return 0  # pragma: no cover - execve does not return


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loopscope`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.subcommand == "run":
        return _run(args)
    handler = getattr(args, "handler", None)
    if handler is not None:
        status: int = handler(args)
        return status
    parser.print_help(sys.stderr)
    return 2


# --- the remover of the temporary directory ----------------------------------------------


def _start_remover(directory: str) -> bool:
    """Start the process that removes ``directory`` once this process (and the command it
    is about to become) has ended; whether it started.  Never raises.

    It is forked twice (so that it is no child of the command, which might wait for every
    child it has) and executes ``python -I -S`` on this file, so that the process list shows
    what it is rather than a second copy of the command line."""
    script = os.path.abspath(__file__)
    if not hasattr(os, "fork") or not sys.executable or not os.path.isfile(script):
        return False
    pid = os.getpid()
    owned: list[int] = []  # descriptors to close here
    try:
        pidfd = -1
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            with contextlib.suppress(OSError):
                pidfd = pidfd_open(pid)
                owned.append(pidfd)
        argv = [sys.executable, "-I", "-S", script, _REMOVER_ARG, str(pid), str(pidfd), directory]
        # Both ends are close-on-exec: the pipe reads as closed once the remover has
        # started; it writes to it only when it could not.
        ready_r, ready_w = os.pipe()
        owned += [ready_r, ready_w]
        middle = os.fork()
        if middle == 0:
            _fork_remover(argv, pidfd, ready_w)
        os.close(owned.pop())  # ready_w
        with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored: reaped already
            os.waitpid(middle, 0)
        failure = b""
        while chunk := os.read(ready_r, 512):
            failure += chunk
        return not failure
    except OSError:
        return False
    finally:
        for fd in owned:
            with contextlib.suppress(OSError):
                os.close(fd)


def _fork_remover(argv: list[str], pidfd: int, ready_w: int) -> NoReturn:
    """In the intermediate child: a session of its own, then the remover, then leave."""
    try:
        os.setsid()
        if os.fork() == 0:
            try:
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_IGN)  # stays ignored through exec
                os.chdir("/")
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                _close_descriptors(keep={ready_w, pidfd})
                if pidfd >= 0:
                    os.set_inheritable(pidfd, True)
                os.execv(argv[0], argv)
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    os.write(ready_w, (repr(exc) or "failed").encode())
            os._exit(127)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            os.write(ready_w, (repr(exc) or "failed").encode())
    os._exit(0)


def _close_descriptors(keep: set[int]) -> None:
    """Close every descriptor above 2 but ``keep``: the remover holds none of the
    command's (a listening socket handed down, a pipe the caller reads to its end)."""
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        try:
            limit = os.sysconf("SC_OPEN_MAX")
        except (AttributeError, ValueError, OSError):
            limit = 256
        open_fds = list(range(3, min(limit if limit > 0 else 256, 65536)))
    for fd in open_fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _remove_when_ended(argv: Sequence[str]) -> int:
    """The remover's main: wait for process ``argv[0]`` (through the pidfd ``argv[1]``, or
    by polling when it is -1) to end, then remove the directory ``argv[2]``."""
    pid, pidfd, directory = int(argv[0]), int(argv[1]), argv[2]
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    ended = False
    if pidfd >= 0:
        import select

        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        events: list[tuple[int, int]] = []
        while not events:
            events = poller.poll()
        # POLLNVAL: not the pidfd after all; then poll the process id.
        ended = not any(mask & select.POLLNVAL for _fd, mask in events)
    if not ended:
        import time

        while _alive(pid):
            time.sleep(0.5)
    _remove_directory(directory)
    return 0


def _alive(pid: int) -> bool:
    # Not _processes.pid_alive: the remover runs this file as a script under ``python -I``,
    # where the loopscope package cannot be imported.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_directory(directory: str) -> None:
    """Remove the temporary directory the launcher created: the files loopscope writes
    there, then the directory (kept if anything else is in it)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name.startswith(("loopscope-", ".loopscope")):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


# --- inside the instrumented processes ---------------------------------------------------


def bootstrap() -> None:
    """Called by loopscope's ``sitecustomize`` at interpreter start-up.  Never raises."""
    if os.environ.get(RUN_FLAG) != "1":
        return
    try:
        _install()
    except Exception as exc:
        with contextlib.suppress(Exception):
            print(f"loopscope: this process is not instrumented: {exc}", file=sys.stderr)


def _install() -> None:
    from . import _installation
    from ._options import ConfigError

    command = os.environ.get(OWNER_FLAG, "") == str(os.getpid())
    directory = os.environ.get(TMPDIR_FLAG, "")
    if command and directory:
        # Registered before install() registers the last write of this process's file:
        # exit hooks run last-registered-first, so the directory goes after that write.
        atexit.register(_remove_at_exit, directory, os.getpid())
    try:
        installation = _installation.install()
    except ConfigError as exc:
        if command or not str(exc).startswith("option port"):
            raise  # the command serves the port: it must say why it cannot
        # Another process of the command serves the port (with everyone's figures).
        installation = _installation.install(port=None)
    if installation.port is not None:
        # This process serves the merged view; the others join when they make a loop.
        installation.share_figures()


def _remove_at_exit(directory: str, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked worker that inherited the hook
        _remove_directory(directory)


def load_next_sitecustomize() -> None:
    """Import the ``sitecustomize`` module that loopscope's own one shadows, if any."""
    import importlib

    this = sys.modules.get("sitecustomize")
    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != SITE_DIR]
        del sys.modules["sitecustomize"]
        try:
            importlib.import_module("sitecustomize")
        except ImportError as exc:
            if exc.name != "sitecustomize":
                raise
    except Exception as exc:
        with contextlib.suppress(Exception):
            print(f"loopscope: error in the next sitecustomize: {exc!r}", file=sys.stderr)
    finally:
        sys.path[:] = saved
        if this is not None and "sitecustomize" not in sys.modules:
            # The import statement that is running us reads the module back from here.
            sys.modules["sitecustomize"] = this


if __name__ == "__main__" and sys.argv[1:2] == [_REMOVER_ARG]:
    # The remover (see _start_remover): ``python -I -S _run.py --remove-when-ended ...``.
    sys.exit(_remove_when_ended(sys.argv[2:]))
