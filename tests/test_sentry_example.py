"""examples/sentry_instrument.py: a slow step sent to Sentry, caught by a test transport
in this process, and by a loopback HTTP server standing for Sentry when the example runs
as a program."""

from __future__ import annotations

import gzip
import http.server
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import sentry_sdk
from examples import sentry_instrument
from prometheus_client import CollectorRegistry
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

import loopscope

from .test_examples import ROOT, example_env, line_of

EXAMPLE = "examples/sentry_instrument.py"


class CapturingTransport(Transport):
    """Keeps the envelopes the SDK would send."""

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)


@pytest.fixture(name="sentry")
def fixture_sentry() -> Iterator[CapturingTransport]:
    """sentry_sdk set up with the capturing transport and no integration (which would
    patch libraries for the rest of the test run); closed afterwards."""
    transport = CapturingTransport()
    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        transport=transport,
        default_integrations=False,
        auto_enabling_integrations=False,
    )
    yield transport
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)


def check_event(event: Any) -> None:
    """``event`` is the Sentry event of the example's blocking request."""
    line = line_of(EXAMPLE, "time.sleep(")
    location = f"{EXAMPLE}:{line} in handle"
    assert event["fingerprint"] == ["loopscope-block", location]
    assert event["level"] == "warning"
    assert event["logger"] == "loopscope"
    assert event["message"].startswith("loop MainThread blocked ")
    assert event["message"].endswith(f" in task request-3 (handle) at {location}")
    details = event["contexts"]["loopscope"]
    assert details["location"] == location
    assert (details["loop"], details["kind"], details["task"], details["coro"]) == (
        "MainThread", "task", "request-3", "handle",
    )  # fmt: skip
    assert details["duration"] >= 0.3 > details["threshold"] == 0.1
    (thread,) = event["threads"]["values"]
    assert thread["name"] == "MainThread"
    assert thread["current"] is True
    frames = thread["stacktrace"]["frames"]
    assert frames[-1] == {
        "filename": EXAMPLE,
        "abs_path": str(ROOT / EXAMPLE),
        "lineno": line,
        "function": "handle",
        "in_app": True,
    }
    # The standard library's frames (asyncio's, or runpy's) are not the application's.
    assert any(not frame["in_app"] for frame in frames), frames


def test_slow_step_sent_with_location_and_stack(
    sentry: CapturingTransport,
    registry: CollectorRegistry,
    run: Callable[[Callable[[], Awaitable[None]]], None],
) -> None:
    """The example's blocking request becomes one Sentry event at level warning, grouped
    by the blocking line, whose thread's stack trace ends at that line."""
    loopscope.install(
        registry=registry, events="off", instruments=[sentry_instrument.SentryBlocks()]
    )
    run(sentry_instrument.serve)
    sentry_sdk.flush()
    events: list[Any] = [
        event for envelope in sentry.envelopes if (event := envelope.get_event()) is not None
    ]
    assert len(events) == 1, events
    check_event(events[0])


class SentryIngest(http.server.BaseHTTPRequestHandler):
    """Sentry's envelope endpoint: keeps every envelope posted to it."""

    envelopes: list[Envelope]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        encoding = self.headers.get("Content-Encoding")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "br":
            body = pytest.importorskip("brotli").decompress(body)
        self.envelopes.append(Envelope.deserialize(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_program_sends_the_block_to_its_dsn(loop_kind: str) -> None:
    """``python -m examples.sentry_instrument`` with ``SENTRY_DSN`` naming a loopback
    server posts the event of its blocking request there, and exits."""
    envelopes: list[Envelope] = []
    handler = type("Handler", (SentryIngest,), {"envelopes": envelopes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        dsn = f"http://public@127.0.0.1:{server.server_address[1]}/1"
        done = subprocess.run(
            [sys.executable, "-m", "examples.sentry_instrument", "--loop", loop_kind],
            cwd=ROOT, env={**example_env(), "SENTRY_DSN": dsn}, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
        serving.join()
    assert done.returncode == 0, done.stderr
    events = [event for envelope in envelopes if (event := envelope.get_event()) is not None]
    assert len(events) == 1, (events, done.stderr)
    check_event(events[0])
