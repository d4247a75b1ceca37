"""An instrument that sends the steps that block the event loop to Sentry.

    pip install sentry-sdk
    SENTRY_DSN=https://<key>@<host>/<project> python -m examples.sentry_instrument --loop uvloop

Each slow step becomes one Sentry event at level warning: its message says how long the
loop was blocked and where, its stack trace is the blocking stack (taken while the loop was
blocked, innermost frame last), and its fingerprint is the blocking line, so Sentry groups
the blocks of one line into one issue, whatever the request.  The program runs a few
requests, one of which blocks the loop for 0.3 s, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import sysconfig
import time
from typing import Any

import sentry_sdk
from sentry_sdk.types import Event

import loopscope

# Frames in these directories are the standard library's or an installed package's.
LIBRARY_DIRS = tuple(
    os.path.join(os.path.realpath(sysconfig.get_path(name)), "")
    for name in ("stdlib", "platstdlib", "purelib", "platlib")
)


class SentryBlocks(loopscope.Instrument):
    """Sends every slow step to Sentry with ``sentry_sdk.capture_event``.

    ``slow_step`` runs on the loop's thread; ``capture_event`` only queues the event, and
    the SDK sends it from its own thread.
    """

    def slow_step(self, event: loopscope.SlowStep) -> None:
        sentry_sdk.capture_event(sentry_event(event))


def sentry_event(event: loopscope.SlowStep) -> Event:
    """The Sentry event for one slow step."""
    if event.kind == "task":
        what = f"task {event.task} ({event.coro})"
    else:
        what = f"callback {event.callback}"
    where = event.location or "an unknown line"
    details = {
        "loop": event.loop,
        "duration": event.duration,
        "threshold": event.threshold,
        "kind": event.kind,
        "task": event.task,
        "coro": event.coro,
        "callback": event.callback,
        "location": event.location,
        "importing": event.importing,
    }
    return {
        "level": "warning",
        "logger": "loopscope",
        "message": f"loop {event.loop} blocked {event.duration * 1000:.0f} ms in {what} at {where}",
        # One issue per blocking line.
        "fingerprint": ["loopscope-block", event.location or "unknown"],
        "tags": {"loop": event.loop, "block.kind": event.kind},
        "contexts": {"loopscope": details},
        # The loop thread's stack while it was blocked.
        "threads": {
            "values": [
                {
                    "name": event.loop,
                    "current": True,
                    "stacktrace": {"frames": [frame(entry) for entry in event.blocking_stack]},
                }
            ]
        },
    }


def frame(entry: str) -> dict[str, Any]:
    """A Sentry frame for a ``"path:lineno in function"`` entry of the blocking stack."""
    head, _, function = entry.rpartition(" in ")
    path, _, lineno = head.rpartition(":")
    return {
        "filename": relative(path),
        "abs_path": path,
        "lineno": int(lineno) if lineno.isdigit() else None,
        "function": function,
        "in_app": not path.startswith("<") and not os.path.realpath(path).startswith(LIBRARY_DIRS),
    }


def relative(path: str) -> str:
    """``path`` relative to the longest ``sys.path`` entry that holds it."""
    roots = [os.path.join(os.path.abspath(p), "") for p in sys.path]
    holding = [root for root in roots if path.startswith(root)]
    return path[len(max(holding, key=len)) :] if holding else path


async def handle(request: int) -> None:
    """A request handler; request 3 makes a blocking call (as a synchronous client would)."""
    if request == 3:
        time.sleep(0.3)  # blocks the event loop: one Sentry event
    await asyncio.sleep(0.01)


async def serve() -> None:
    """Handle five requests, each in its own task."""
    tasks = [asyncio.create_task(handle(n), name=f"request-{n}") for n in range(5)]
    await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    options = parser.parse_args()

    sentry_sdk.init(dsn=os.environ.get("SENTRY_DSN"))  # no DSN: nothing is sent
    loopscope.install(instruments=[SentryBlocks()])
    if options.loop == "uvloop":
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())
    loopscope.uninstall()
    sentry_sdk.flush()


if __name__ == "__main__":
    main()
