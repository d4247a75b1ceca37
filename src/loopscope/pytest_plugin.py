"""pytest plugin: fail a test whose event loop was blocked for longer than a limit.

Off by default.  ``pytest --loopscope-max-block=0.05`` applies to every test;
``@pytest.mark.loopscope(max_block=0.05)`` to one test (and wins over the option);
``@pytest.mark.loopscope(max_block=None)`` exempts a test.  Works with pytest-asyncio: the
detection starts before the test's fixtures make its loop and ends after their teardown.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import ExitStack

import pytest

from .testing import BlockingRecorder, detect_blocking, format_blocks

_MISSING = object()
_stack_key = pytest.StashKey[ExitStack]()
_recorder_key = pytest.StashKey[BlockingRecorder]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loopscope")
    group.addoption(
        "--loopscope-max-block",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fail a test when an event loop step blocks for SECONDS or longer",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "loopscope(max_block=SECONDS): fail the test when its event loop is blocked for "
        "SECONDS or longer (None exempts the test)",
    )
    limit = config.getoption("--loopscope-max-block")
    if limit is not None and not limit > 0:
        raise pytest.UsageError(f"--loopscope-max-block must be > 0 seconds; got {limit}")


def _limit(item: pytest.Item) -> float | None:
    marker = item.get_closest_marker("loopscope")
    if marker is not None:
        value = marker.kwargs.get("max_block", marker.args[0] if marker.args else _MISSING)
        if value is _MISSING:
            raise pytest.UsageError(f"{item.nodeid}: use @pytest.mark.loopscope(max_block=...)")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0):  # fmt: skip
            raise pytest.UsageError(
                f"{item.nodeid}: loopscope max_block must be seconds > 0 or None; got {value!r}"
            )
        return None if value is None else float(value)
    option = item.config.getoption("--loopscope-max-block")
    return None if option is None else float(option)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    limit = _limit(item)
    if limit is not None:
        stack = ExitStack()
        item.stash[_recorder_key] = stack.enter_context(detect_blocking(limit))
        item.stash[_stack_key] = stack
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    result = yield
    recorder = item.stash.get(_recorder_key, None)
    if recorder is not None and recorder.blocks:
        pytest.fail(format_blocks(recorder.blocks, recorder.max_block), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        stack = item.stash.get(_stack_key, None)
        if stack is not None:
            stack.close()
