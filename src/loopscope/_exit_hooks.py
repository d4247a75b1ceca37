"""Work to do when the process exits, also in ``multiprocessing`` children.

A process started by ``multiprocessing`` (uvicorn's ``--workers``, hypercorn's) ends with
``os._exit()`` after its target returns, so ``atexit`` hooks never run there; its own
finalizers (``multiprocessing.util.Finalize`` with an exit priority) do.  :func:`at_exit`
registers a hook both ways; the hook runs once, whichever comes first.
"""

from __future__ import annotations

import atexit
import sys
import threading
from collections.abc import Callable

__all__ = ["at_exit"]


def at_exit(hook: Callable[[], None]) -> None:
    """Call ``hook`` (once) when the interpreter exits normally or the ``multiprocessing``
    child process it runs in finishes."""
    done = threading.Lock()

    def once() -> None:
        if done.acquire(blocking=False):
            hook()

    atexit.register(once)
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is not None and multiprocessing.parent_process() is not None:
        from multiprocessing import util

        util.Finalize(None, once, exitpriority=0)
