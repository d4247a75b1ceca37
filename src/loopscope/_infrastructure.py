"""Which loops belong to the server around the application, not to the application.

Some servers run event loops of their own next to the application's.  gunicorn 25.1+ runs
one in its master (arbiter) process: ``gunicorn.ctl.server.ControlSocketServer._run_loop``
calls ``asyncio.run()`` in a ``threading.Thread`` to serve the control socket, and starts a
new thread after every fork of a worker, so each respawn named one more series
(``loop="Thread-1 (_run_loop)"``, ``"Thread-2 (_run_loop)"``, ...).  With dirty apps
(gunicorn 25.0+), the dirty arbiter process (``gunicorn.dirty.arbiter.DirtyArbiter.run``)
runs ``asyncio.run()`` on its main thread: its figures were merged into the workers'
``loop="MainThread"``, and the dirty workers it forks from inside that loop reported the
inherited loop as blocked.  Neither loop runs application code.

The constructor wrapper asks :func:`created_by_server_infrastructure` once per new loop
(construction is rare; nothing on the per-callback path changes).  It walks up from the
constructor, past the frames of the loop machinery (asyncio, uvloop, loopscope), to the
first frame of the code that asked for a loop, and answers whether that code's module is in
:data:`INFRASTRUCTURE_MODULES`.  Only that direct creator counts: a gunicorn worker's loop
is created by uvicorn, aiohttp or ``gunicorn.workers`` code, with ``gunicorn.arbiter``
further up the stack, and stays instrumented.  ``loopscope.instrument(loop)`` does not ask:
an explicit request always instruments.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Final

__all__ = ["INFRASTRUCTURE_MODULES", "created_by_server_infrastructure", "creator_module"]

#: Modules (and their submodules) whose loops are the server's, not the application's.
INFRASTRUCTURE_MODULES: Final[tuple[str, ...]] = (
    "gunicorn.ctl",  # the master's control socket server
    "gunicorn.dirty.arbiter",  # the dirty arbiter process
)

#: Packages that make loops on someone else's behalf; the creator is their caller.
_LOOP_MACHINERY: Final[tuple[str, ...]] = ("asyncio", "uvloop", "loopscope")

#: How many frames to look at before giving up (and instrumenting).
_MAX_DEPTH: Final = 64


def _in_package(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def creator_module(frame: FrameType | None) -> str | None:
    """The module of the first frame, from ``frame`` outwards, outside the loop machinery;
    None when there is none within reach or its module has no name."""
    depth = 0
    while frame is not None and depth < _MAX_DEPTH:
        module = frame.f_globals.get("__name__")
        if not isinstance(module, str):
            return None
        if not _in_package(module, _LOOP_MACHINERY):
            return module
        frame = frame.f_back
        depth += 1
    return None


def created_by_server_infrastructure(frame: FrameType | None = None) -> bool:
    """Whether the loop being constructed was asked for by a server-infrastructure module.

    Call it from the loop's constructor; ``frame`` is where to start looking (default: the
    caller's frame).  Never raises: on any doubt the answer is False (instrument)."""
    try:
        start = frame if frame is not None else sys._getframe(1)
        try:
            module = creator_module(start)
        finally:
            del start
        return module is not None and _in_package(module, INFRASTRUCTURE_MODULES)
    except Exception:
        return False
