"""gunicorn configuration for an instrumented ASGI app with several workers.

    gunicorn -c examples/gunicorn.conf.py examples.fastapi_app:app
    loopscope run --port 9100 -- gunicorn -c examples/gunicorn.conf.py examples.zero_code_asgi:app

Each worker runs its own event loop in its own process.  Their figures are merged through a
shared directory (``LOOPSCOPE_MULTIPROCESS_DIR``): this file creates one for the run when
none is set, empties it when gunicorn starts, and removes it when gunicorn exits.  Then
``/metrics`` on any worker (the FastAPI example has a route for it) or on ``loopscope run``'s port
(served by the gunicorn master) shows the totals over every worker, including workers that
died and were replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "4"))
# uvloop's loop; "uvicorn_worker.UvicornH11Worker" runs asyncio's own loop.
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "uvicorn_worker.UvicornWorker")
graceful_timeout = 5

_created = not os.environ.get("LOOPSCOPE_MULTIPROCESS_DIR")
if _created:
    os.environ["LOOPSCOPE_MULTIPROCESS_DIR"] = tempfile.mkdtemp(prefix="loopscope-gunicorn-")


def on_starting(server: Any) -> None:
    """A fresh start: figures of an earlier run must not be added to this one's."""
    directory = os.environ["LOOPSCOPE_MULTIPROCESS_DIR"]
    mine = f"loopscope-{os.getpid()}-"  # under `loopscope run`, the master's own file
    for name in os.listdir(directory):
        if name.startswith("loopscope-") and name.endswith(".json") and not name.startswith(mine):
            os.unlink(os.path.join(directory, name))


def on_exit(server: Any) -> None:
    """Remove the directory this file created."""
    if _created:
        shutil.rmtree(os.environ["LOOPSCOPE_MULTIPROCESS_DIR"], ignore_errors=True)
