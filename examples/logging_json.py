"""loopscope's events in an application that logs JSON lines with the standard library.

    python -m examples.logging_json --loop asyncio        # or --loop uvloop

loopscope logs each slow step to the standard logger ``loopscope`` at WARNING, with every
field of the event (``duration``, ``location``, ``blocking_stack``, ``task``...) as an
attribute of the log record.  The small formatter below writes those attributes as keys of
one JSON object per line, next to the message, level and logger.  The program serves a few
requests, one of which blocks the loop for 0.3 s, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

import loopscope

# The attributes every log record has; anything else on a record came from ``extra``.
RECORD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((k, v) for k, v in vars(record).items() if k not in RECORD_ATTRIBUTES)
        return json.dumps(line, default=str)


async def handle(request: int) -> None:
    """A request handler; request 3 makes a blocking call (as a synchronous client would)."""
    if request == 3:
        time.sleep(0.3)  # blocks the event loop: one slow_callback event
    await asyncio.sleep(0.01)
    logging.getLogger("app").info("request %d done", request)


async def serve() -> None:
    """Handle five requests, each in its own task."""
    tasks = [asyncio.create_task(handle(n), name=f"request-{n}") for n in range(5)]
    await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    options = parser.parse_args()

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])

    # events="logging": the standard logging module, even where structlog is configured.
    loopscope.install(events="logging")
    if options.loop == "uvloop":
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())
    loopscope.uninstall()


if __name__ == "__main__":
    main()
