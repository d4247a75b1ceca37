"""A service that traces its requests with the OpenTelemetry SDK, for the exemplar end-to-end
test: one HTTP server on asyncio's loop and one on uvloop, each in its own thread (named
after its loop, which makes the ``loop`` label), and loopscope's endpoint for both.

``GET /block?ms=N`` blocks its loop for N ms inside the request's span; every answer's body
is the request's trace id.  Prints ``ready <asyncio port> <uvloop port> <metrics port>``
once serving, and stops when its standard input closes."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

import uvloop
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import loopscope

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("traced_service")


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    target = head.split(b" ", 2)[1].decode()
    url = urlsplit(target)
    with tracer.start_as_current_span(f"GET {url.path}") as span:
        if url.path == "/block":
            time.sleep(float(parse_qs(url.query).get("ms", ["100"])[0]) / 1000)
        body = format(span.get_span_context().trace_id, "032x").encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    writer.write(body)
    await writer.drain()
    writer.close()


def serve(new_loop: type[asyncio.AbstractEventLoop] | None, ports: list[int]) -> None:
    loop = uvloop.new_event_loop() if new_loop is not None else asyncio.new_event_loop()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ports.append(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    loop.run_until_complete(main())


def main() -> None:
    installation = loopscope.install(port=0, slow_threshold=0.05)
    asyncio_ports: list[int] = []
    uvloop_ports: list[int] = []
    for name, kind, ports in (
        ("asyncio-loop", None, asyncio_ports),
        ("uvloop-loop", uvloop.Loop, uvloop_ports),
    ):
        threading.Thread(target=serve, args=(kind, ports), name=name, daemon=True).start()
    while not (asyncio_ports and uvloop_ports):
        time.sleep(0.01)
    print("ready", asyncio_ports[0], uvloop_ports[0], installation.port, flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
