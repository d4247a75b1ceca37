"""libuv's idle-time metric for a uvloop loop, reached through ctypes.

uvloop does not expose ``uv_metrics_idle_time()``, but its extension module exports
libuv's symbols and a ``uvloop.Loop`` keeps its ``uv_loop_t *`` as the first field after
the object header and Cython's vtable pointer.  The pointer is used only after it proves
itself: the loop's backend descriptor must be an epoll instance and libuv's clock must agree
with ``loop.time()``.  Otherwise (another platform, an unknown uvloop layout) this returns
None and busy time falls back to the sum of the measured callbacks.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["idle_time_reader"]

UV_METRICS_IDLE_TIME = 1
#: uvloop releases whose Loop layout has been checked.
_KNOWN_UVLOOP = ((0, 17), (0, 24))
_POINTER = ctypes.sizeof(ctypes.c_void_p)


def _library() -> Any:
    import uvloop.loop

    lib = ctypes.CDLL(uvloop.loop.__file__)
    lib.uv_backend_fd.argtypes = [ctypes.c_void_p]
    lib.uv_backend_fd.restype = ctypes.c_int
    lib.uv_now.argtypes = [ctypes.c_void_p]
    lib.uv_now.restype = ctypes.c_uint64
    lib.uv_loop_configure.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.uv_loop_configure.restype = ctypes.c_int
    lib.uv_metrics_idle_time.argtypes = [ctypes.c_void_p]
    lib.uv_metrics_idle_time.restype = ctypes.c_uint64
    return lib


def idle_time_reader(loop: Any) -> Callable[[], int] | None:
    """A function returning the loop's idle nanoseconds so far, or None if unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        from importlib.metadata import version as installed_version

        version = tuple(int(part) for part in installed_version("uvloop").split(".")[:2])
        if not _KNOWN_UVLOOP[0] <= version < _KNOWN_UVLOOP[1] or loop.is_closed():
            return None
        lib = _library()
        handle = ctypes.c_void_p.from_address(id(loop) + 3 * _POINTER).value
        if not handle:
            return None
        fd = lib.uv_backend_fd(handle)
        if fd < 0 or os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventpoll]":
            return None
        if abs(lib.uv_now(handle) - loop.time() * 1000) > 1000:
            return None
        if lib.uv_loop_configure(handle, UV_METRICS_IDLE_TIME) != 0:
            return None
    except Exception:
        return None

    def idle_nanoseconds() -> int:
        return int(lib.uv_metrics_idle_time(handle))

    return idle_nanoseconds
