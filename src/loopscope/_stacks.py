"""Turning a thread's frames into a blocking stack and the application line that blocked."""

from __future__ import annotations

import os
import sys
import sysconfig
from types import FrameType

__all__ = [
    "application_entry",
    "application_location",
    "application_stack",
    "format_stack",
    "frame_of",
    "is_importing",
    "library_rules",
    "own_code_location",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: loopscope's bundled demo is an application like any other.
_DEMO_DIR = os.path.join(_PACKAGE_DIR, "demo") + os.sep


def _own_dirs() -> tuple[str, ...]:
    """loopscope and the event loops: never the application, wherever installed."""
    dirs = [_PACKAGE_DIR]
    try:
        import uvloop

        dirs.append(os.path.dirname(os.path.abspath(uvloop.__file__)) + os.sep)
    except ImportError:
        pass
    return tuple(dirs)


def _stdlib_dirs() -> tuple[str, ...]:
    dirs = set()
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.abspath(path) + os.sep)
    return tuple(sorted(dirs))


_OWN_DIRS = _own_dirs()
_STDLIB_DIRS = _stdlib_dirs()
_SITE_MARKERS = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


#: A stack deeper than this keeps its outermost and innermost frames (how the program got
#: there, and what it was doing), with one entry saying how many were left out between.
MAX_FRAMES = 100
_OUTER_FRAMES = 20
#: Frames walked at most (a runaway recursion is not walked to its end).
_WALK_LIMIT = 10_000
#: How the entry standing for the frames left out begins.
_MARKER = "... ("


def _entry(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


def format_stack(frame: FrameType | None, limit: int = MAX_FRAMES) -> list[str]:
    """``"path:lineno in function"`` for each frame, innermost last.  A stack of more than
    ``limit`` frames keeps its 20 outermost and its innermost ones, with the entry
    ``"... (N frames left out) ..."`` between them."""
    frames: list[FrameType] = []
    while frame is not None and len(frames) < _WALK_LIMIT:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    if len(frames) <= limit:
        return [_entry(f) for f in frames]
    outer = min(_OUTER_FRAMES, limit // 2)
    more = "+" if frame is not None else ""  # the walk stopped before the outermost frame
    return [
        *(_entry(f) for f in frames[:outer]),
        f"{_MARKER}{len(frames) - limit}{more} frames left out) ...",
        *(_entry(f) for f in frames[outer - limit :]),
    ]


def _is_library(filename: str) -> bool:
    if filename.startswith("<frozen"):
        return True
    if filename.startswith("<"):
        return False  # <string>, <stdin>: code the application ran itself
    path = os.path.abspath(filename)
    if path.startswith(_OWN_DIRS):
        return not path.startswith(_DEMO_DIR)
    if any(marker in path for marker in _SITE_MARKERS):
        return False  # an installed third-party package is the application's code
    return path.startswith(_STDLIB_DIRS)


def library_rules() -> tuple[str, ...]:
    """:func:`_is_library`'s choice for absolute paths, as rules for the GIL reader's C code
    (tried in order, the first that matches decides): ``"+prefix"`` a library,
    ``"-prefix"`` the application, ``"~part"`` (anywhere in the path) the application."""
    own = [f"+{path}" for path in _OWN_DIRS]
    return (
        f"-{_DEMO_DIR}",
        *own,
        *(f"~{marker}" for marker in _SITE_MARKERS),
        *(f"+{path}" for path in _STDLIB_DIRS),
    )


def _short(filename: str) -> str:
    """The path relative to the longest sys.path entry that contains it."""
    path = os.path.abspath(filename)
    best = ""
    for entry in sys.path:
        root = os.path.abspath(entry or os.curdir) + os.sep
        if path.startswith(root) and len(root) > len(best):
            best = root
    return path[len(best) :] if best else path


def _entry_file(entry: str) -> str:
    """The file of a ``"path:lineno in function"`` stack entry ("" for the marker)."""
    return entry.rpartition(" in ")[0].rpartition(":")[0]


def _short_entry(entry: str) -> str:
    """``entry`` with its path made relative to sys.path."""
    head, _, function = entry.rpartition(" in ")
    filename, _, lineno = head.rpartition(":")
    return f"{_short(filename)}:{lineno} in {function}"


def application_entry(stack: list[str] | tuple[str, ...]) -> str | None:
    """The innermost entry of ``stack`` that belongs to the application; None if none."""
    for entry in reversed(stack):
        filename = _entry_file(entry)
        if filename and not _is_library(filename):
            return entry
    return None


def application_location(stack: list[str] | tuple[str, ...]) -> str | None:
    """The innermost entry of ``stack`` that belongs to the application, with its path made
    relative to sys.path (``"app/handlers.py:42 in get_user"``); None if there is none."""
    entry = application_entry(stack)
    return None if entry is None else _short_entry(entry)


#: Files of the import system: a step with one of them on its stack is importing a module.
_IMPORT_FILES = (
    "<frozen importlib._bootstrap>",
    "<frozen importlib._bootstrap_external>",
    "<frozen zipimport>",
)


def is_importing(stack: list[str] | tuple[str, ...]) -> bool:
    """Whether ``stack`` is inside the import system (a module is being imported)."""
    return any(_entry_file(entry) in _IMPORT_FILES for entry in stack)


def _package_of(filename: str) -> str | None:
    """The installed package a file belongs to (the directory under site-packages), or
    None for a file that is not in an installed package."""
    path = os.path.abspath(filename)
    for marker in _SITE_MARKERS:
        _, found, rest = path.partition(marker)
        if found:
            top = rest.split(os.sep, 1)[0]
            return top[:-3] if top.endswith(".py") else top
    return None


#: Where installed programs' launchers are (``bin/uvicorn``, ``bin/gunicorn``).
_SCRIPTS_DIRS = tuple(
    sorted(
        {
            os.path.abspath(path) + os.sep
            for path in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable))
            if path
        }
    )
)


_IMPORT_SYSTEM = "the import system"


def _owner(filename: str, outermost: bool) -> str | None:
    """Who a frame of ``filename`` belongs to when it is not the application's own code
    (an installed package's name, ``asyncio``, ``loopscope``...); None for the latter (and
    for the entry standing for frames left out, which has no file)."""
    if not filename:
        return None
    if filename in _IMPORT_FILES:
        return _IMPORT_SYSTEM
    if filename.startswith("<frozen"):
        return "the standard library"
    if filename.startswith("<"):
        # ``python -c`` code: a program's launcher (multiprocessing's spawned workers) when
        # it is where the stack starts, else code the application ran itself.
        return "the launcher" if outermost and filename == "<string>" else None
    path = os.path.abspath(filename)
    if path.startswith(_OWN_DIRS) and not path.startswith(_DEMO_DIR):
        return "loopscope" if path.startswith(_PACKAGE_DIR) else "uvloop"
    package = _package_of(filename)
    if package is not None:
        return package
    if path.startswith(_STDLIB_DIRS):
        return "asyncio" if f"{os.sep}asyncio{os.sep}" in path else "the standard library"
    if outermost and path.startswith(_SCRIPTS_DIRS):
        return "the launcher"
    return None


def _own_code(stack: list[str] | tuple[str, ...]) -> list[bool]:
    """For each entry of ``stack``: is it a frame of the application's own code?"""
    return [
        not entry.startswith(_MARKER) and _owner(_entry_file(entry), i == 0) is None
        for i, entry in enumerate(stack)
    ]


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def application_stack(stack: list[str] | tuple[str, ...]) -> list[str]:
    """``stack`` cut down for a person: the frames of the application's own code (not the
    standard library's, nor an installed package's, nor the loop's) and, inward of the
    innermost of them, the first frame it called and the two innermost (what it was
    waiting in; the import system's frames aside); each run of frames left out is one line
    that counts them by owner.  The whole stack when it has no frame of the application's
    own."""
    owners = [_owner(_entry_file(entry), i == 0) for i, entry in enumerate(stack)]
    own = [i for i, is_own in enumerate(_own_code(stack)) if is_own]
    if not own:
        return list(stack)
    innermost = own[-1]
    # Inward of the application's last line: the first frame it called and the two it
    # ended in (what it was waiting in); those between are counted.
    called = [i for i in range(innermost + 1, len(stack)) if owners[i] != _IMPORT_SYSTEM]
    shown_inward = set(called[:1] + called[-2:])
    shown: list[str] = []
    run: dict[str, int] = {}

    def close_run() -> None:
        if run:
            count = sum(run.values())
            names = sorted(run, key=lambda name: (-run[name], name))
            shown.append(f"({count} frame{'s' if count != 1 else ''} of {_listed(names)})")
            run.clear()

    for i, (entry, owner) in enumerate(zip(stack, owners, strict=True)):
        if owner is None or i in shown_inward:
            close_run()
            shown.append(entry)
        else:
            run[owner] = run.get(owner, 0) + 1
    close_run()
    return shown


def own_code_location(stack: list[str] | tuple[str, ...]) -> str | None:
    """Like :func:`application_location`, but of the application's own code only: an
    installed package's frame does not count (for an import, the line that imported)."""
    own = [entry for entry, is_own in zip(stack, _own_code(stack), strict=True) if is_own]
    return _short_entry(own[-1]) if own else None


def frame_of(entry: str) -> tuple[str, int, str] | None:
    """``(path, lineno, function)`` of a ``"path:lineno in function"`` entry."""
    head, _, function = entry.rpartition(" in ")
    path, _, lineno = head.rpartition(":")
    if not path or not lineno.isdigit():
        return None
    return path, int(lineno), function
