"""``loopscope top [URL ...]``: a live view of the loops of one or more loopscope endpoints.

On a terminal it draws with ``rich`` (the ``top`` extra: ``pip install 'loopscope[top]'``)
and reads single keys in cbreak mode: ``q`` quits, ``p`` pauses, ``s`` changes the sort,
``l`` picks one loop (and back to all).  Without a terminal (``loopscope top | tee``), it
prints one plain line per loop and interval, and a line per new slow step.  The figures
come from :mod:`._top_session`, which reads the endpoints.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from ._top_figures import Endpoint, EndpointError, default_url
from ._top_format import plain_event, plain_row
from ._top_session import TopSession, Watched

__all__ = ["add_command", "plain_lines", "run_top"]


def add_command(commands: Any) -> None:
    """Add ``top`` to the ``loopscope`` command's subcommands."""
    top = commands.add_parser(
        "top",
        help="a live view of the loops of running services",
        description=(
            "Attach to one or more loopscope endpoints and show, refreshed every interval, "
            "each loop's lag, utilization, task steps, tasks, slow steps and executors, the "
            "lines that blocked it most and its recent slow steps with their stacks. Keys: "
            "q quits, p pauses, s changes the sort, l picks a loop. Without a terminal, "
            "prints one plain line per loop and interval."
        ),
        allow_abbrev=False,
    )
    top.add_argument(
        "urls",
        nargs="*",
        metavar="URL",
        help="http(s)://host:port/metrics or host:port of a loopscope endpoint (default: "
        "LOOPSCOPE_PORT's local endpoint, else http://127.0.0.1:9100/metrics)",
    )
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                     help="seconds between two reads (default: 1)")  # fmt: skip
    top.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                     help="seconds to run (default: 0, until q or Ctrl-C)")  # fmt: skip
    top.add_argument("--user", metavar="USER", help="user name for HTTP basic authentication")
    top.add_argument(
        "--password-file",
        metavar="FILE",
        help="file holding the basic-authentication password (kept off the command line)",
    )
    top.add_argument("--cafile", metavar="FILE", help="PEM CA certificates to trust (https)")
    top.add_argument("--record", metavar="FILE",
                     help="also write what is seen to FILE, for loopscope report")  # fmt: skip
    top.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """``loopscope top``: one-line errors on stderr, exit status 2 for bad arguments and 1
    when no endpoint could be read at all."""
    if not 0.05 <= args.interval <= 3600:
        return _fail("--interval must be from 0.05 to 3600 seconds")
    if args.duration < 0:
        return _fail("--duration must be 0 (no end) or more seconds")
    password: str | None = None
    if args.user is not None and args.password_file is None:
        return _fail("--user needs --password-file, the file that holds the password")
    if args.password_file is not None:
        if args.user is None:
            return _fail("--password-file needs --user")
        try:
            with open(args.password_file, encoding="utf-8") as file:
                password = file.read(4096).rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            return _fail(f"--password-file {args.password_file!r}: cannot read it ({exc})")
    urls = args.urls or [default_url(os.environ)]
    try:
        endpoints = [
            Endpoint(url, user=args.user, password=password, cafile=args.cafile) for url in urls
        ]
    except EndpointError as exc:
        return _fail(str(exc))
    record: IO[str] | None = None
    if args.record is not None:
        try:
            record = open(args.record, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            return _fail(f"--record {args.record!r}: cannot write it ({exc.strerror or exc})")
    try:
        return run_top(endpoints, interval=args.interval, duration=args.duration, record=record)
    finally:
        if record is not None:
            record.close()


def _fail(message: str, status: int = 2) -> int:
    print(f"loopscope top: {message}", file=sys.stderr)
    return status


def run_top(
    endpoints: list[Endpoint],
    *,
    interval: float = 1.0,
    duration: float = 0.0,
    record: IO[str] | None = None,
    out: IO[str] | None = None,
) -> int:
    """Watch ``endpoints`` until ``q``, Ctrl-C or ``duration`` seconds (0: no end)."""
    stream = out if out is not None else sys.stdout
    session = TopSession(endpoints, record)
    try:
        session.poll()
        failed = [w for w in session.watched if w.down is not None]
        if len(failed) == len(session.watched):
            for watched in failed:
                print(f"loopscope top: {watched.down}", file=sys.stderr)
            return 1
        terminal = stream.isatty() and sys.stdin.isatty()
        if terminal:
            try:
                import rich  # noqa: F401 - only to know it is there
            except ImportError:
                return _fail(
                    "the terminal view needs the rich package: pip install 'loopscope[top]' "
                    "(without a terminal, as in 'loopscope top | cat', top prints plain lines)",
                    1,
                )
            from ._top_view import run_live

            run_live(session, interval, duration)
        else:
            _run_plain(session, interval, duration, stream)
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    return 0


def _run_plain(session: TopSession, interval: float, duration: float, out: IO[str]) -> None:
    started = time.monotonic()
    next_poll = started + interval
    while duration <= 0 or time.monotonic() - started < duration:
        time.sleep(max(0.0, next_poll - time.monotonic()))
        next_poll += interval
        if next_poll < time.monotonic():  # fell behind (a slow endpoint): no catching up
            next_poll = time.monotonic() + interval
        new_events = session.poll()
        stamp = time.strftime("%H:%M:%S")
        for watched in session.watched:
            for line in plain_lines(watched, stamp):
                print(line, file=out)
        for _watched, event in new_events:
            print(plain_event(event), file=out)
        out.flush()


def plain_lines(watched: Watched, stamp: str) -> Iterator[str]:
    """The plain lines of one endpoint for one interval."""
    if watched.down is not None:
        yield f"{stamp} {watched.endpoint.name} DOWN {watched.down}"
        return
    for row in watched.rows:
        yield f"{stamp} {plain_row(row)}"
