"""The endpoint's /loopscope/events path: the most recent slow steps as JSON, behind the
same TLS and authentication as /metrics, and an option that turns it off."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import loopscope
from loopscope._event_ring import EventRing

from .test_endpoint_security import Pki
from .test_endpoint_security import _get as request

Run = Callable[[Callable[[], Awaitable[Any]]], Any]
EVENTS = "/loopscope/events"


def _get(port: int, path: str = EVENTS, **options: Any) -> tuple[int, dict[str, str], bytes]:
    """A request to the endpoint's events path (or ``path``): status, headers, body."""
    return request(port, path, **options)


def _blocking_call() -> None:
    time.sleep(0.15)  # five times the slow threshold: its stack is surely taken


async def _block() -> None:
    await asyncio.sleep(0)
    _blocking_call()
    await asyncio.sleep(0)


class TestEventsPath:
    """What /loopscope/events serves."""

    def test_slow_step_served(self, registry: CollectorRegistry, run: Run) -> None:
        """A slow step shows up with its location and blocking stack, as JSON."""
        installation = loopscope.install(registry=registry, port=0, slow_threshold=0.03)
        assert installation.port is not None
        status, _headers, body = _get(installation.port)
        assert status == 200 and json.loads(body)["events"] == []
        run(_block)
        status, headers, body = _get(installation.port)
        assert status == 200 and headers["Content-Type"] == "application/json"
        document = json.loads(body)
        assert document["loopscope_events"] == 1 and document["capacity"] > 0
        [event] = document["events"]
        assert event["event"] == "slow_callback" and event["duration"] >= 0.03
        assert "test_events_endpoint.py" in event["location"]
        assert "_blocking_call" in event["location"]
        assert any("in _block" in entry for entry in event["blocking_stack"])

    def test_head(self, registry: CollectorRegistry) -> None:
        """HEAD gets the headers only; other methods get 405."""
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None
        status, headers, body = _get(installation.port, method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
        assert _get(installation.port, method="POST")[0] == 405

    def test_off(self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
        """events_endpoint=False (or its variable) leaves the path a 404, /metrics served."""
        installation = loopscope.install(registry=registry, port=0, events_endpoint=False)
        assert installation.port is not None
        assert _get(installation.port)[0] == 404
        assert _get(installation.port, "/metrics")[0] == 200
        loopscope.uninstall()
        monkeypatch.setenv("LOOPSCOPE_EVENTS_ENDPOINT", "off")
        installation = loopscope.install(registry=registry, port=0)
        assert installation.port is not None and not installation.options.events_endpoint
        assert _get(installation.port)[0] == 404

    @pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
    def test_bad_variable(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, value: str
    ) -> None:
        """A bad LOOPSCOPE_EVENTS_ENDPOINT is refused, naming the variable."""
        monkeypatch.setenv("LOOPSCOPE_EVENTS_ENDPOINT", value)
        with pytest.raises(loopscope.ConfigError, match="LOOPSCOPE_EVENTS_ENDPOINT"):
            loopscope.install(registry=registry, port=0)

    def test_bad_keyword(self, registry: CollectorRegistry) -> None:
        """A value that is no switch is refused, naming the option."""
        with pytest.raises(loopscope.ConfigError, match="events_endpoint"):
            loopscope.install(registry=registry, port=0, events_endpoint="sometimes")

    def test_ring_is_bounded(self) -> None:
        """The ring keeps the last events only, numbered in the order they came."""
        ring = EventRing(capacity=3)
        event = loopscope.SlowStep(
            loop="main", threshold=0.1, kind="callback", task=None, coro=None,
            callback="cb", location=None, blocking_stack=(), importing=False,
            started=0.0, timestamp=0.0, thread="main", duration=0.2,
        )  # fmt: skip
        for _ in range(5):
            ring.slow_step(event)
        document = json.loads(ring.json())
        assert [e["seq"] for e in document["events"]] == [3, 4, 5]
        assert document["seen"] == 5
        assert ring.json() is ring.json()  # not built again without a new event
        ring.slow_step(event)
        assert [e["seq"] for e in json.loads(ring.json())["events"]] == [4, 5, 6]


class TestProtected:
    """The events are behind the endpoint's authentication and TLS."""

    def test_needs_credentials(self, registry: CollectorRegistry) -> None:
        """Without the right credentials: 401 and no event."""
        installation = loopscope.install(
            registry=registry, port=0, basic_auth_username="u", basic_auth_password="pw"
        )
        assert installation.port is not None
        status, _headers, body = _get(installation.port)
        assert status == 401 and b"events" not in body
        token = base64.b64encode(b"u:pw").decode()
        status, _headers, body = _get(
            installation.port, headers={"Authorization": f"Basic {token}"}
        )
        assert status == 200 and "events" in json.loads(body)

    def test_over_tls(self, registry: CollectorRegistry, shared_pki: Pki) -> None:
        """Over HTTPS with the endpoint's certificate."""
        installation = loopscope.install(
            registry=registry,
            port=0,
            tls_certfile=str(shared_pki.server_cert),
            tls_keyfile=str(shared_pki.server_key),
        )
        assert installation.port is not None
        status, _headers, body = _get(installation.port, context=shared_pki.client_context())
        assert status == 200 and "events" in json.loads(body)
