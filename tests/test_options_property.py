"""Property-based tests of every option, as a keyword argument and as a LOOPSCOPE_* variable:
an invalid value is refused with an error that names the option, and nothing is installed."""

from __future__ import annotations

import asyncio
import math
import os
import string
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import loopscope
from loopscope import _installation
from loopscope._options import Options, env_name, resolve_options

from .conftest import make_loop

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_objects = st.one_of(
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.builds(object),
    st.binary(max_size=4),
    st.complex_numbers(allow_nan=False),
)


def _float_ok(text: str, upper: float) -> bool:
    try:
        value = float(text)
    except (ValueError, OverflowError):
        return False
    return math.isfinite(value) and 0 < value <= upper


def _seconds(upper: float) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[str]]:
    bad_numbers = st.one_of(
        st.floats(max_value=0.0),
        st.floats(min_value=upper, exclude_min=True),
        st.just(math.nan),
        st.integers(max_value=0),
        st.integers(min_value=int(upper) + 1),
    )
    bad_text = st.text(max_size=12).filter(lambda t: not _float_ok(t, upper))
    return st.one_of(bad_numbers, bad_text, _objects.filter(lambda v: v is not None)), bad_text


def _port_text_ok(text: str) -> bool:
    stripped = text.strip()
    return stripped == "" or (
        stripped.isascii() and stripped.isdigit() and len(stripped) <= 5 and int(stripped) <= 65535
    )


def _cap_text_ok(text: str) -> bool:
    stripped = text.strip()
    return (
        stripped.isascii()
        and stripped.isdigit()
        and len(stripped) <= 5
        and 1 <= int(stripped) <= 10_000
    )


_missing_path = st.text(string.ascii_letters, min_size=1, max_size=10).map(
    lambda t: f"/nonexistent-loopscope/{t}.pem"
)
_unprintable = st.text(min_size=1, max_size=5).map(lambda t: t + "\x07")

_CAP = (
    st.one_of(
        st.integers(max_value=0),
        st.integers(min_value=10_001),
        st.booleans(),
        st.floats(),
        st.none(),
        st.text(max_size=7).filter(lambda t: not _cap_text_ok(t)),
    ),
    st.text(max_size=7).filter(lambda t: not _cap_text_ok(t)),
)


#: For every option: (invalid keyword values, invalid variable values or None).
def _choices(words: set[str]) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[str]]:
    """Values that are none of ``words`` (in any case, with any blanks around)."""
    text = st.text(max_size=12).filter(lambda t: t.strip().lower() not in words)
    return st.one_of(text, st.integers(), st.none(), st.booleans()), text


_SWITCH = {"1", "0", "true", "false", "yes", "no", "on", "off"}
_OTEL_WORDS = {"1", "true", "yes", "on", "0", "false", "no", "off"}

INVALID: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[str] | None]] = {
    "slow_threshold": _seconds(3600.0),
    "lag_interval": _seconds(60.0),
    "port": (
        st.one_of(
            st.integers(max_value=-1),
            st.integers(min_value=65536),
            st.floats(),
            st.booleans(),
            st.text(max_size=8).filter(lambda t: not _port_text_ok(t)),
        ),
        st.text(max_size=8).filter(lambda t: not _port_text_ok(t)),
    ),
    "addr": (
        st.one_of(
            st.just(""),
            st.text(" \t\n", min_size=1, max_size=3),
            st.text(max_size=5).map(lambda t: f"{t} x"),
            st.integers(),
            st.none(),
        ),
        st.text(min_size=1, max_size=5).map(lambda t: f"a {t}"),
    ),
    "loop_name": (
        st.one_of(
            st.just(""),
            st.text(min_size=129, max_size=140),
            _unprintable,
            st.integers(),
            st.booleans(),
        ),
        st.one_of(st.text(min_size=129, max_size=140), _unprintable),
    ),
    "events": _choices({"auto", "structlog", "logging", "off"}),
    "loop_blocked_after": _seconds(3600.0),
    "log_stack": _choices({"application", "full", "none"}),
    "import_events": _choices({"once", "all", "off"}),
    "stderr_reports": (
        st.one_of(_choices(_SWITCH)[1], st.integers(), st.none(), st.floats()),
        _choices(_SWITCH)[1],
    ),
    "events_endpoint": (
        st.one_of(_choices(_SWITCH)[1], st.integers(), st.none(), st.floats()),
        _choices(_SWITCH)[1],
    ),
    "max_loop_labels": _CAP,
    "max_locations": _CAP,
    "max_executor_labels": _CAP,
    "multiprocess_dir": (
        st.one_of(_missing_path, st.integers(), st.just("a\x00b"), st.just(__file__)),
        st.one_of(_missing_path, st.just(__file__)),
    ),
    "registry": (st.one_of(_objects, st.text(max_size=3), st.integers()), None),
    "instruments": (
        st.one_of(
            st.integers(),
            st.just(loopscope.Instrument()),
            st.lists(st.one_of(_objects, st.integers()), min_size=1, max_size=3),
        ),
        None,
    ),
    "otel": (
        st.one_of(
            st.text(max_size=8).filter(lambda t: t.strip().lower() not in _OTEL_WORDS),
            st.integers(),
            st.floats(),
            st.just(object()),
        ),
        st.text(max_size=8).filter(lambda t: t.strip().lower() not in _OTEL_WORDS),
    ),
    "tls_certfile": (st.one_of(_missing_path, st.integers(), st.just("a\x00b")), _missing_path),
    "tls_keyfile": (st.one_of(_missing_path, st.integers(), st.just("a\x00b")), _missing_path),
    "tls_client_cafile": (
        st.one_of(_missing_path, st.integers(), st.just("a\x00b")),
        _missing_path,
    ),
    "basic_auth_username": (
        st.one_of(
            st.text(max_size=5).map(lambda t: t + ":"),
            _unprintable,
            st.text(min_size=257, max_size=260),
            st.integers(),
        ),
        st.one_of(st.text(max_size=5).map(lambda t: t + ":"), _unprintable),
    ),
    "basic_auth_password": (
        st.one_of(_unprintable, st.text(min_size=1025, max_size=1030), st.integers()),
        _unprintable,
    ),
}


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith("LOOPSCOPE_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)
        os.environ.update(saved)


def _assert_nothing_installed(registry: CollectorRegistry, threads_before: int) -> None:
    assert _installation.current() is None
    assert getattr(asyncio.BaseEventLoop.__init__, "__wrapped__", None) is None
    assert list(registry.collect()) == []
    assert threading.active_count() <= threads_before
    assert not any(t.name == "loopscope-metrics" for t in threading.enumerate())


def _refused(option: str, named: str, **kwargs: Any) -> None:
    registry = CollectorRegistry()
    threads = threading.active_count()
    try:
        with pytest.raises(loopscope.ConfigError) as caught:
            loopscope.install(registry=registry, **kwargs)
    finally:
        if _installation.current() is not None:
            loopscope.uninstall()
    assert named in str(caught.value), (option, str(caught.value))
    _assert_nothing_installed(registry, threads)


class TestEveryOptionIsCovered:
    """The table of invalid values covers every option install() accepts."""

    def test_table_is_complete(self) -> None:
        """Each field of Options has an entry (a new option needs its own strategies)."""
        assert {f.name for f in fields(Options)} <= set(INVALID)

    def test_every_variable_is_covered(self) -> None:
        """Each option with a LOOPSCOPE_* variable has invalid values for the variable."""
        without = {name for name, (_, env) in INVALID.items() if env is None}
        assert without == {f.name for f in fields(Options) if not f.metadata["variable"]}


@pytest.mark.parametrize("option", sorted(INVALID))
class TestInvalidValues:
    """Every invalid value is refused with the option's name; nothing is half-installed."""

    def test_keyword(self, option: str) -> None:
        """An invalid keyword argument names the option."""
        strategy, _env = INVALID[option]

        @SETTINGS
        @given(value=strategy)
        def check(value: Any) -> None:
            kwargs = {option: value}
            if option == "registry":
                registry_value = kwargs.pop("registry")
                registry = CollectorRegistry()
                threads = threading.active_count()
                with pytest.raises(loopscope.ConfigError, match="registry"):
                    loopscope.install(registry=registry_value)
                _assert_nothing_installed(registry, threads)
                return
            with _environment({}):
                _refused(option, option, **kwargs)

        check()


@pytest.mark.parametrize(
    "option", sorted(name for name, (_, env) in INVALID.items() if env is not None)
)
class TestInvalidVariables:
    def test_variable(self, option: str) -> None:
        """An invalid LOOPSCOPE_* variable names the variable (every option that has one:
        all but ``registry`` and ``instruments``)."""
        _strategy, env_strategy = INVALID[option]
        assert env_strategy is not None

        @SETTINGS
        @given(value=env_strategy.filter(lambda v: v.strip() != ""))  # blank: unset (below)
        def check(value: str) -> None:
            if "\x00" in value:
                return  # the environment cannot hold NUL characters
            with _environment({env_name(option): value}):
                _refused(option, env_name(option))

        check()


#: Blank text: the environment cannot hold NUL, and any other whitespace counts.
_blank = st.text(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2003\u3000", max_size=4)


@pytest.mark.parametrize("option", sorted(set(INVALID) - {"registry"}))
class TestBlankVariables:
    """An empty or blank LOOPSCOPE_* variable is the same as an unset one."""

    def test_unset(self, option: str) -> None:
        """A blank variable gives the option's default (install() reads the environment
        through resolve_options)."""

        @SETTINGS
        @given(value=_blank)
        def check(value: str) -> None:
            assert resolve_options({}, {env_name(option): value}) == Options()

        check()


class TestValidValues:
    """Valid values are accepted and a loop of either kind runs under them."""

    @SETTINGS
    @given(
        slow=st.floats(min_value=1e-6, max_value=3600.0),
        lag=st.floats(min_value=1e-3, max_value=60.0),
        cap=st.integers(min_value=1, max_value=10_000),
        name=st.one_of(st.none(), st.text(min_size=1, max_size=128).filter(str.isprintable)),
        events=st.sampled_from(["auto", "LOGGING", " off ", "Structlog"]),
        as_text=st.booleans(),
    )
    def test_accepted(
        self,
        loop_kind: str,
        slow: float,
        lag: float,
        cap: int,
        name: str | None,
        events: str,
        as_text: bool,
    ) -> None:
        """Keyword and variable forms give the same Options; the loop runs measured."""
        env = {
            "LOOPSCOPE_SLOW_THRESHOLD": repr(slow),
            "LOOPSCOPE_LAG_INTERVAL": repr(lag),
            "LOOPSCOPE_MAX_LOOP_LABELS": f" {cap} ",
            "LOOPSCOPE_EVENTS": events,
        }
        if name is not None:
            env["LOOPSCOPE_LOOP_NAME"] = name
        registry = CollectorRegistry()
        with _environment(env if as_text else {}):
            if as_text:
                installation = loopscope.install(registry=registry)
            else:
                installation = loopscope.install(
                    registry=registry,
                    slow_threshold=slow,
                    lag_interval=lag,
                    max_loop_labels=cap,
                    loop_name=name,
                    events=events,
                )
            if as_text and name is not None and name.strip() == "":
                name = None  # a blank variable is an unset one
            try:
                options = installation.options
                assert (options.slow_threshold, options.lag_interval) == (slow, lag)
                assert (options.max_loop_labels, options.loop_name) == (cap, name)
                assert options.events == events.strip().lower()
                loop = make_loop(loop_kind)
                try:
                    loop.run_until_complete(asyncio.sleep(0))
                finally:
                    loop.close()
                label = name if name is not None else threading.current_thread().name
                steps = registry.get_sample_value("asyncio_loop_task_steps_total", {"loop": label})
                assert steps is not None and steps >= 1
            finally:
                loopscope.uninstall()
