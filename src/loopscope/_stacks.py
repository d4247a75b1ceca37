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


def format_stack(frame: FrameType | None, limit: int = 60) -> list[str]:
    """``"path:lineno in function"`` for each frame, innermost last."""
    entries: list[str] = []
    while frame is not None and len(entries) < limit:
        code = frame.f_code
        entries.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        frame = frame.f_back
    entries.reverse()
    return entries


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


def _short(filename: str) -> str:
    """The path relative to the longest sys.path entry that contains it."""
    path = os.path.abspath(filename)
    best = ""
    for entry in sys.path:
        root = os.path.abspath(entry or os.curdir) + os.sep
        if path.startswith(root) and len(root) > len(best):
            best = root
    return path[len(best) :] if best else path


def application_entry(stack: list[str] | tuple[str, ...]) -> str | None:
    """The innermost entry of ``stack`` that belongs to the application; None if none."""
    for entry in reversed(stack):
        filename = entry.rpartition(" in ")[0].rpartition(":")[0]
        if filename and not _is_library(filename):
            return entry
    return None


def application_location(stack: list[str] | tuple[str, ...]) -> str | None:
    """The innermost entry of ``stack`` that belongs to the application, with its path made
    relative to sys.path (``"app/handlers.py:42 in get_user"``); None if there is none."""
    entry = application_entry(stack)
    if entry is None:
        return None
    head, _, function = entry.rpartition(" in ")
    filename, _, lineno = head.rpartition(":")
    return f"{_short(filename)}:{lineno} in {function}"


#: Files of the import system: a step with one of them on its stack is importing a module.
_IMPORT_FILES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")


def _entry_file(entry: str) -> str:
    """The file of a ``"path:lineno in function"`` stack entry."""
    return entry.rpartition(" in ")[0].rpartition(":")[0]


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


def _owner(filename: str) -> str | None:
    """Who a frame of ``filename`` belongs to when it is not the application's own code
    (an installed package's name, ``asyncio``, ``loopscope``...); None for the latter."""
    if filename.startswith("<frozen"):
        return "the standard library"
    if filename.startswith("<"):
        return None
    path = os.path.abspath(filename)
    if path.startswith(_OWN_DIRS) and not path.startswith(_DEMO_DIR):
        return "loopscope" if path.startswith(_PACKAGE_DIR) else "uvloop"
    package = _package_of(filename)
    if package is not None:
        return package
    if path.startswith(_STDLIB_DIRS):
        return "asyncio" if f"{os.sep}asyncio{os.sep}" in path else "the standard library"
    return None


def application_stack(stack: list[str] | tuple[str, ...]) -> list[str]:
    """``stack`` cut down for a person: the frames of the application's own code (not the
    standard library's, nor an installed package's, nor the loop's) and every frame
    inward of the innermost of them, which show what the application's line was waiting
    in; the frames left out are counted by owner in a last line.  The whole stack when
    it has no frame of the application's own."""
    owners = [_owner(_entry_file(entry)) for entry in stack]
    own = [i for i, owner in enumerate(owners) if owner is None]
    if not own:
        return list(stack)
    innermost = own[-1]
    shown: list[str] = []
    hidden: dict[str, int] = {}
    for i, (entry, owner) in enumerate(zip(stack, owners, strict=True)):
        if owner is None or i > innermost:
            shown.append(entry)
        else:
            hidden[owner] = hidden.get(owner, 0) + 1
    if hidden:
        count = sum(hidden.values())
        names = sorted(hidden, key=lambda name: (-hidden[name], name))
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        shown.append(f"({count} frame{'s' if count != 1 else ''} of {listed} not shown)")
    return shown


def frame_of(entry: str) -> tuple[str, int, str] | None:
    """``(path, lineno, function)`` of a ``"path:lineno in function"`` entry."""
    head, _, function = entry.rpartition(" in ")
    path, _, lineno = head.rpartition(":")
    if not path or not lineno.isdigit():
        return None
    return path, int(lineno), function
