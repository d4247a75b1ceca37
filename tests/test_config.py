"""Options and environment variables: bad input is refused with a clear error, nothing
half-installed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import loopscope
from loopscope import _installation


def _assert_nothing_installed(registry: CollectorRegistry, init: Any) -> None:
    assert _installation.current() is None
    assert asyncio.BaseEventLoop.__dict__["__init__"] is init
    assert list(registry.collect()) == []


class TestBadKeywords:
    """Bad keyword arguments name the option."""

    @pytest.mark.parametrize(
        ("options", "named"),
        [
            ({"slow_threshold": -1}, "slow_threshold"),
            ({"slow_threshold": "fast"}, "slow_threshold"),
            ({"slow_threshold": float("nan")}, "slow_threshold"),
            ({"slow_threshold": True}, "slow_threshold"),
            ({"lag_interval": 0}, "lag_interval"),
            ({"port": 70000}, "port"),
            ({"port": -1}, "port"),
            ({"port": "http"}, "port"),
            ({"addr": ""}, "addr"),
            ({"addr": 127}, "addr"),
            ({"loop_name": ""}, "loop_name"),
            ({"slow_events": "maybe"}, "slow_events"),
            ({"max_loop_labels": 0}, "max_loop_labels"),
            ({"registry": "default"}, "registry"),
            ({"slow_treshold": 0.1}, "slow_treshold"),
        ],
    )
    def test_refused(
        self, registry: CollectorRegistry, options: dict[str, Any], named: str
    ) -> None:
        """install() raises ConfigError naming the option and installs nothing."""
        init = asyncio.BaseEventLoop.__dict__["__init__"]
        with pytest.raises(loopscope.ConfigError, match=named):
            loopscope.install(**{"registry": registry, **options})
        _assert_nothing_installed(registry, init)

    def test_port_taken(self, registry: CollectorRegistry, busy_port: int) -> None:
        """A port in use is refused with the address in the message."""
        init = asyncio.BaseEventLoop.__dict__["__init__"]
        with pytest.raises(loopscope.ConfigError, match=f"port.*{busy_port}"):
            loopscope.install(registry=registry, port=busy_port)
        _assert_nothing_installed(registry, init)

    def test_valid_error_is_value_error(self) -> None:
        """ConfigError is a ValueError, so generic handlers catch it."""
        assert issubclass(loopscope.ConfigError, ValueError)


class TestEnvironment:
    """LOOPSCOPE_* variables configure install(), and bad ones are refused."""

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("LOOPSCOPE_SLOW_THRESHOLD", "abc"),
            ("LOOPSCOPE_SLOW_THRESHOLD", "-0.5"),
            ("LOOPSCOPE_LAG_INTERVAL", "inf"),
            ("LOOPSCOPE_PORT", "99999"),
            ("LOOPSCOPE_PORT", "9100x"),
            ("LOOPSCOPE_SLOW_EVENTS", "sometimes"),
            ("LOOPSCOPE_MAX_LOOP_LABELS", "many"),
            ("LOOPSCOPE_SLOWTHRESHOLD", "0.1"),
        ],
    )
    def test_refused(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, name: str, value: str
    ) -> None:
        """A bad variable is named in the error and nothing is installed."""
        init = asyncio.BaseEventLoop.__dict__["__init__"]
        monkeypatch.setenv(name, value)
        with pytest.raises(loopscope.ConfigError, match=name):
            loopscope.install(registry=registry)
        _assert_nothing_installed(registry, init)

    def test_applied(self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
        """Variables set the options; keywords win over them."""
        monkeypatch.setenv("LOOPSCOPE_SLOW_THRESHOLD", "0.25")
        monkeypatch.setenv("LOOPSCOPE_LOOP_NAME", "from-env")
        installation = loopscope.install(registry=registry, loop_name="from-kwarg")
        assert installation.options.slow_threshold == 0.25
        assert installation.options.loop_name == "from-kwarg"
