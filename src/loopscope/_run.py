"""``loopscope run [options] -- COMMAND ARGS...``: instrument a Python command without changing it.

The launcher turns its options into ``LOOPSCOPE_*`` variables, validates them (a bad value
is reported before anything starts), prepends the directory of loopscope's
``sitecustomize`` module to ``PYTHONPATH``, sets ``LOOPSCOPE_RUN=1`` and replaces itself with
the command (``exec``: same process id, signals go straight to the command).  Every Python
interpreter started with that environment (the command, and the worker processes it forks
or spawns) imports ``sitecustomize`` at start-up, before the application's code, and
:func:`bootstrap` calls ``loopscope.install()`` there.

Several processes share one set of totals through ``multiprocess_dir``: unless one is given,
the launcher of a Python command creates a temporary directory, which the process it
becomes removes at exit.
The ``/metrics`` port, when asked for, is served by the first process that binds it (the
command itself: a gunicorn master or a uvicorn supervisor), with the merged figures of
every process; the others skip it quietly.

A process that cannot be instrumented (another interpreter without loopscope, a bad
variable) prints one line on stderr and runs unchanged.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence

__all__ = ["SITE_DIR", "bootstrap", "build_environment", "is_python_program", "main"]

#: The directory holding loopscope's ``sitecustomize.py``.
SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sitecustomize")
RUN_FLAG = "LOOPSCOPE_RUN"
OWNER_FLAG = "LOOPSCOPE_RUN_OWNER"

_PYTHON_NAME = re.compile(r"(python|pypy)[0-9.]*(\.exe)?\Z", re.IGNORECASE)

#: Command-line options and the install() option each one sets.
_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--port", "port", "serve /metrics on this TCP port (0 picks one), merged over processes"),
    ("--addr", "addr", "address the /metrics endpoint binds (default 127.0.0.1)"),
    ("--slow-threshold", "slow_threshold", "seconds at or over which a step is slow"),
    ("--lag-interval", "lag_interval", "seconds between two heartbeats of the lag probe"),
    ("--loop-name", "loop_name", "value of the loop label (default: the thread's name)"),
    ("--slow-events", "slow_events", "log slow_callback events: true or false"),
    ("--max-loop-labels", "max_loop_labels", "distinct loop labels before 'other'"),
    ("--max-executor-labels", "max_executor_labels", "distinct executor labels before 'other'"),
    (
        "--multiprocess-dir",
        "multiprocess_dir",
        "shared directory merging the figures of every process (default: a new temporary one)",
    ),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopscope",
        description="Event-loop metrics for asyncio and uvloop applications.",
    )
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run a Python command with loopscope installed in it and in its workers",
        description=(
            "Run COMMAND (python app.py, uvicorn app:app, gunicorn ..., python -m pkg) with "
            "loopscope.install() called at interpreter start-up in it and in every Python "
            "process it starts. Options not given are read from LOOPSCOPE_* variables."
        ),
        usage="loopscope run [options] -- COMMAND [ARGS...]",
    )
    for flag, _option, text in _OPTIONS:
        run.add_argument(flag, dest=_option, metavar="VALUE", help=text)
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    return parser


def build_environment(
    options: dict[str, str],
    environ: dict[str, str] | None = None,
    *,
    temporary_directory: bool = True,
) -> dict[str, str]:
    """The environment for the command: ``LOOPSCOPE_*`` from ``options`` over ``environ``,
    validated, with loopscope's ``sitecustomize`` first on ``PYTHONPATH``, and (with
    ``temporary_directory``, when none is set) a new multiprocess directory that the
    process the launcher becomes removes at exit.  Raises :class:`loopscope.ConfigError`
    for a bad value."""
    from ._options import env_name, resolve_options

    env = dict(os.environ if environ is None else environ)
    for option, value in options.items():
        env[env_name(option)] = value
    env.pop(OWNER_FLAG, None)
    env[RUN_FLAG] = "1"
    resolve_options({}, env)  # every value checked before the command starts
    if temporary_directory and not env.get(env_name("multiprocess_dir"), "").strip():
        env[env_name("multiprocess_dir")] = tempfile.mkdtemp(prefix="loopscope-")
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


def _run(args: argparse.Namespace) -> int:
    from ._options import ConfigError

    command: list[str] = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("loopscope run: no command given; usage: loopscope run [options] -- COMMAND",
              file=sys.stderr)  # fmt: skip
        return 2
    options = {
        option: getattr(args, option)
        for _flag, option, _text in _OPTIONS
        if getattr(args, option) is not None
    }
    executable = shutil.which(command[0])
    if executable is None:
        print(f"loopscope run: command not found: {command[0]}", file=sys.stderr)
        return 127
    python = is_python_program(executable)
    try:
        # Only a Python command removes the temporary directory at exit.
        env = build_environment(options, temporary_directory=python)
    except ConfigError as exc:
        print(f"loopscope run: {exc}", file=sys.stderr)
        return 2
    if not python:
        print(
            f"loopscope run: {command[0]} ({executable}) is not a Python program, so "
            "loopscope cannot instrument it; it runs unchanged, and only the Python "
            "processes it starts are instrumented",
            file=sys.stderr,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(executable, command, env)
    except OSError as exc:
        print(f"loopscope run: cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 126
    return 0  # pragma: no cover - execve does not return


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loopscope`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.subcommand == "run":
        return _run(args)
    parser.print_help(sys.stderr)
    return 2


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
    from ._multiprocess import attach
    from ._options import ConfigError

    try:
        installation = _installation.install()
    except ConfigError as exc:
        if not str(exc).startswith("option port"):
            raise
        # Another process of the command serves the port (with everyone's figures).
        installation = _installation.install(port=None)
    if installation.port is not None:
        # This process serves the merged view; the others join when they make a loop.
        attach(installation)
    owner = os.environ.get(OWNER_FLAG, "")
    directory = installation.options.multiprocess_dir
    if directory and owner == str(os.getpid()):
        atexit.register(_remove_directory, directory, os.getpid())


def _remove_directory(directory: str, owner: int) -> None:
    """Remove the temporary directory the launcher created (in the process it became)."""
    if os.getpid() != owner:
        return  # a forked worker inherited the hook
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name.startswith(("loopscope-", ".loopscope")):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


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
