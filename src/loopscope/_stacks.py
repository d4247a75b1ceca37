"""Turning a thread's frames into a blocking stack and the application line that blocked."""

from __future__ import annotations

import os
import sys
import sysconfig
from types import FrameType

__all__ = ["application_location", "format_stack"]

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


def application_location(stack: list[str]) -> str | None:
    """The innermost entry of ``stack`` that belongs to the application, with its path made
    relative to sys.path (``"app/handlers.py:42 in get_user"``); None if there is none."""
    for entry in reversed(stack):
        filename, _, rest = entry.rpartition(":")
        lineno, _, function = rest.partition(" in ")
        if not filename or _is_library(filename):
            continue
        return f"{_short(filename)}:{lineno} in {function}"
    return None
