"""Options and environment variables: bad input is refused with a clear error, nothing
half-installed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import loopscope
from loopscope import _installation
from loopscope._options import Options, conflicting_options, option_table, resolve_options

#: Every LOOPSCOPE_* variable that sets an option.
VARIABLES = sorted(info.variable for info in option_table() if info.variable is not None)


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
            ({"events": "maybe"}, "events"),
            ({"events": True}, "events"),
            ({"log_stack": "some"}, "log_stack"),
            ({"import_events": "twice"}, "import_events"),
            ({"loop_blocked_after": 0}, "loop_blocked_after"),
            ({"instruments": object()}, "instruments"),
            ({"instruments": [object()]}, "instruments"),
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
            ("LOOPSCOPE_EVENTS", "sometimes"),
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

    @pytest.mark.parametrize("value", ["", "  ", "\t\n"])
    @pytest.mark.parametrize("name", VARIABLES)
    def test_blank_is_unset(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, name: str, value: str
    ) -> None:
        """An empty or blank variable is the same as an unset one, for every option."""
        monkeypatch.setenv(name, value)
        installation = loopscope.install(registry=registry)
        assert installation.options == Options(registry=registry)

    def test_blank_keyword_still_refused(self, registry: CollectorRegistry) -> None:
        """The rule is the environment's: an empty keyword value is still checked."""
        with pytest.raises(loopscope.ConfigError, match="option addr"):
            loopscope.install(registry=registry, addr="")

    def test_unknown_variable_lists_only_options(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The error for an unknown variable lists the options' variables, not the ones
        loopscope sets or reads for itself."""
        monkeypatch.setenv("LOOPSCOPE_SLOWTHRESHOLD", "0.1")
        with pytest.raises(loopscope.ConfigError) as caught:
            loopscope.install(registry=registry)
        message = str(caught.value)
        assert message.endswith("known ones are " + ", ".join(VARIABLES))
        for internal in ("LOOPSCOPE_RUN", "LOOPSCOPE_PURE_PYTHON"):
            assert internal not in message

    def test_internal_variables_accepted(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The variables loopscope sets or reads for itself are accepted silently."""
        for name in ("LOOPSCOPE_RUN", "LOOPSCOPE_RUN_OWNER", "LOOPSCOPE_RUN_TMPDIR"):
            monkeypatch.setenv(name, "0")
        monkeypatch.setenv("LOOPSCOPE_PURE_PYTHON", "0")
        assert loopscope.install(registry=registry).options == Options(registry=registry)


class TestAddress:
    """With a port, the address must be one of this machine: checked before anything is
    installed, and named as the addr option (or its variable)."""

    @pytest.mark.parametrize(
        ("addr", "why"),
        [
            ("999.1.1.1", "is not a valid IPv4 address"),
            ("1.2.3.4.5", "is not a valid IPv4 address"),
            ("::12345", "is not a valid IPv6 address"),
            ("192.0.2.1", "is not an address of this machine (cannot bind it"),
            ("no-such-host.invalid", "is not an address of this machine (cannot resolve it"),
        ],
    )
    def test_keyword(self, registry: CollectorRegistry, addr: str, why: str) -> None:
        """install(addr=...) names option addr and installs nothing."""
        init = asyncio.BaseEventLoop.__dict__["__init__"]
        with pytest.raises(loopscope.ConfigError) as caught:
            loopscope.install(registry=registry, port=0, addr=addr)
        assert str(caught.value).startswith(f"option addr: {addr!r} {why}")
        _assert_nothing_installed(registry, init)

    def test_variable(self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
        """LOOPSCOPE_ADDR is named when the address came from it."""
        init = asyncio.BaseEventLoop.__dict__["__init__"]
        monkeypatch.setenv("LOOPSCOPE_ADDR", "999.1.1.1")
        monkeypatch.setenv("LOOPSCOPE_PORT", "0")
        with pytest.raises(loopscope.ConfigError, match=r"^environment variable LOOPSCOPE_ADDR:"):
            loopscope.install(registry=registry)
        _assert_nothing_installed(registry, init)

    def test_without_port(self) -> None:
        """Without a port, a malformed address is still refused, while a host name is not
        looked up (nothing binds it)."""
        with pytest.raises(loopscope.ConfigError, match=r"option addr: '999\.1\.1\.1' is not"):
            resolve_options({"addr": "999.1.1.1"}, {})
        assert resolve_options({"addr": "no-such-host.invalid"}, {}).port is None

    def test_local_addresses_accepted(self) -> None:
        """Addresses of this machine pass, numeric or by name."""
        for addr in ("127.0.0.1", "0.0.0.0", "localhost"):
            assert resolve_options({"port": 0, "addr": addr}, {}).addr == addr


class TestSecondInstall:
    """Which options of a later install() call conflict with the installed ones."""

    def test_plain_call_after_port_zero(self) -> None:
        """A plain install() after install(port=0) asks for nothing else."""
        installed = resolve_options({"port": 0}, {})
        assert conflicting_options(installed, {}, {}) == []

    def test_keywords_and_variables_that_differ(self) -> None:
        """Options given by keyword or variable count when they differ, in order."""
        installed = resolve_options({"port": 0, "slow_threshold": 0.2}, {})
        environ = {"LOOPSCOPE_LOOP_NAME": "web", "LOOPSCOPE_SLOW_THRESHOLD": "0.2"}
        later = {"port": None, "slow_threshold": 0.2, "registry": CollectorRegistry()}
        assert conflicting_options(installed, later, environ) == ["port", "loop_name"]

    def test_same_environment(self) -> None:
        """The environment that configured the first call is no conflict for the next."""
        environ = {"LOOPSCOPE_SLOW_THRESHOLD": "0.3", "LOOPSCOPE_PORT": ""}
        installed = resolve_options({"port": 0}, environ)
        assert conflicting_options(installed, {}, environ) == []


def test_renamed_option_says_what_it_is_now(registry: CollectorRegistry) -> None:
    with pytest.raises(
        loopscope.ConfigError, match=r"slow_events is now events \(false is now off\)"
    ):
        loopscope.install(registry=registry, slow_events=False)
    with pytest.raises(loopscope.ConfigError, match=r"Instrument\(\)"):
        loopscope.install(registry=registry, instruments=[loopscope.Instrument])
