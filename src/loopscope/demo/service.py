"""A small asyncio HTTP service instrumented by loopscope, with handlers that block.

Endpoints: ``/`` answers at once; ``/block?ms=N`` blocks the loop in ``time.sleep``;
``/cpu?ms=N`` blocks it with a CPU loop; ``/offload?ms=N`` sleeps in the default executor
(the right way).  Written on asyncio streams so that it needs nothing beyond loopscope.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import IO
from urllib.parse import parse_qs, urlsplit

import loopscope

MAX_BLOCK_MS = 10_000
_open_writers: set[asyncio.StreamWriter] = set()


def _blocking_sleep(ms: float) -> None:
    time.sleep(ms / 1000)


def _burn_cpu(ms: float) -> int:
    deadline = time.perf_counter() + ms / 1000
    spins = 0
    while time.perf_counter() < deadline:
        spins += 1
    return spins


async def _answer(path: str) -> tuple[int, dict[str, object]]:
    url = urlsplit(path)
    query = parse_qs(url.query)
    try:
        ms = float(query.get("ms", ["100"])[0])
    except ValueError:
        return 400, {"error": "ms must be a number of milliseconds"}
    if not 0 <= ms <= MAX_BLOCK_MS:
        return 400, {"error": f"ms must be from 0 to {MAX_BLOCK_MS}"}
    if url.path == "/":
        return 200, {"ok": True}
    if url.path == "/block":
        _blocking_sleep(ms)  # the mistake loopscope is there to find
        return 200, {"blocked_ms": ms}
    if url.path == "/cpu":
        return 200, {"spins": _burn_cpu(ms)}
    if url.path == "/offload":
        await asyncio.get_running_loop().run_in_executor(None, _blocking_sleep, ms)
        return 200, {"offloaded_ms": ms}
    return 404, {"error": "no such endpoint: try /, /block, /cpu or /offload"}


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _open_writers.add(writer)
    try:
        while True:
            request_line = await reader.readline()
            if not request_line:
                break
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            body: dict[str, object]
            if len(parts) < 2:
                status, body = 400, {"error": "bad request line"}
            else:
                status, body = await _answer(parts[1])
            if writer.is_closing():
                break  # the service is stopping and closed the connection meanwhile
            payload = json.dumps(body).encode()
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        _open_writers.discard(writer)
        writer.close()


def _stop_at_end_of(stream: IO[bytes], stop: asyncio.Future[None]) -> None:
    """Cancel ``stop`` once ``stream`` (a pipe from the driver) reaches its end: the driver
    is gone, however it ended."""

    def drain() -> None:
        if not os.read(stream.fileno(), 4096):
            loop.remove_reader(stream.fileno())
            if not stop.done():
                stop.cancel()

    loop = asyncio.get_running_loop()
    loop.add_reader(stream.fileno(), drain)


async def serve(
    host: str,
    port: int,
    ready: Callable[[int], None] | None = None,
    stop_at_stdin_end: bool = False,
) -> None:
    """Serve until cancelled, SIGTERM/SIGINT, or (``stop_at_stdin_end``) the end of the
    standard input."""
    server = await asyncio.start_server(_handle, host, port)
    bound = server.sockets[0].getsockname()[1]
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.cancel)
    if stop_at_stdin_end:
        _stop_at_end_of(sys.stdin.buffer, stop)
    if ready is not None:
        ready(bound)
    async with server:
        with contextlib.suppress(asyncio.CancelledError):
            await stop
        # Close the client connections so that every handler ends on its own, uncancelled.
        for writer in list(_open_writers):
            writer.transport.abort()
        for _ in range(100):
            if not _open_writers:
                break
            await asyncio.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    """``python -m loopscope.demo serve``: run the service."""
    parser = argparse.ArgumentParser(prog="python -m loopscope.demo serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (0: any free one)")
    parser.add_argument("--metrics-port", type=int, default=9100, help="/metrics port")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument(
        "--json-logs", action="store_true", help="log events as JSON lines (for the driver)"
    )
    parser.add_argument(
        "--stop-at-stdin-end",
        action="store_true",
        help="stop when the standard input ends (the driver's pipe: the driver is gone)",
    )
    args = parser.parse_args(argv)
    if args.json_logs:
        import structlog

        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso"),
                structlog.processors.JSONRenderer(),
            ]
        )
    installation = loopscope.install(port=args.metrics_port)

    def ready(port: int) -> None:
        print(
            json.dumps({"event": "demo_ready", "port": port, "metrics_port": installation.port}),
            flush=True,
        )

    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.host, args.port, ready, args.stop_at_stdin_end))
    else:
        asyncio.run(serve(args.host, args.port, ready, args.stop_at_stdin_end))
    return 0


if __name__ == "__main__":
    sys.exit(main())
