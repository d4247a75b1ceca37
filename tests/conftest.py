"""Shared fixtures: every behavioural test runs on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry

import loopscope
from loopscope import _installation

pytest_plugins = ["pytester"]

T = TypeVar("T")

LOOP_KINDS = ["asyncio", "uvloop"]


def make_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A fresh loop of ``kind`` made the way an application makes it."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_class(kind: str) -> type[asyncio.AbstractEventLoop]:
    """The class a loop of ``kind`` is made with."""
    if kind == "uvloop":
        import uvloop

        return uvloop.Loop
    return asyncio.SelectorEventLoop


def patched_names(loop: asyncio.AbstractEventLoop, kind: str) -> set[str]:
    """The names of the loop's methods that loopscope has replaced: on the loop itself, or
    on the class of the loop's own that it gives the loop (see ``_own_class``)."""
    names = set(vars(loop))
    cls = type(loop)
    if cls is not loop_class(kind):
        assert cls.__bases__ == (loop_class(kind),) and vars(cls)["__slots__"] == ()
        names |= set(vars(cls)) - {"__slots__", "__module__", "__qualname__", "__doc__"}
    return names


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """pytest-asyncio runs every async test once per loop kind."""
    return {kind: (lambda kind=kind: make_loop(kind)) for kind in LOOP_KINDS}


@pytest.fixture(name="loop_kind", params=LOOP_KINDS)
def fixture_loop_kind(request: pytest.FixtureRequest) -> str:
    """The loop implementation under test."""
    return str(request.param)


@pytest.fixture(name="busy_port")
def fixture_busy_port() -> Iterator[int]:
    """A loopback port that is already taken."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(scope="session", name="shared_pki")
def fixture_shared_pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A throw-away CA and certificates (tests/test_endpoint_security.py's ``Pki``), made
    once per session for the modules that only need to serve and trust HTTPS."""
    from .test_endpoint_security import _NO_OPENSSL, Pki

    if _NO_OPENSSL:
        pytest.skip("needs openssl")
    return Pki(tmp_path_factory.mktemp("shared-pki"))


@pytest.fixture(name="registry")
def fixture_registry() -> CollectorRegistry:
    """A fresh registry per test."""
    return CollectorRegistry()


@pytest.fixture(name="installed")
def fixture_installed(registry: CollectorRegistry) -> Iterator[loopscope.Installation]:
    """loopscope installed on the test's registry, uninstalled afterwards."""
    installation = loopscope.install(registry=registry)
    yield installation
    loopscope.uninstall()


#: The one LOOPSCOPE_* variable a test keeps: it chooses the hot path this run tests, also
#: in the processes a test starts.  Every other one would configure loopscope.
HOT_PATH_VARIABLE = "LOOPSCOPE_PURE_PYTHON"


@pytest.fixture(autouse=True)
def _clean_installation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(__import__("os").environ):
        if name.startswith("LOOPSCOPE_") and name != HOT_PATH_VARIABLE:
            monkeypatch.delenv(name)
    yield
    loopscope.uninstall()
    assert _installation.current() is None


@pytest.fixture(name="run")
def fixture_run(loop_kind: str) -> Callable[[Callable[[], Awaitable[T]]], T]:
    """Run a coroutine function to completion on a new loop of the kind under test."""

    def run(main: Callable[[], Awaitable[T]]) -> T:
        loop = make_loop(loop_kind)
        try:
            return loop.run_until_complete(main())
        finally:
            loop.close()

    return run


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0.0 when the series does not exist yet."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def loop_label(**extra: Any) -> dict[str, str]:
    """Labels of the main thread's loop."""
    return {"loop": "MainThread", **{k: str(v) for k, v in extra.items()}}
