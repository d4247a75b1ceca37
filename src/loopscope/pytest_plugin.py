"""pytest plugin: fail a test whose event loop was blocked for longer than a limit.

Off by default.  The limit of a test comes from, first to last:
``@pytest.mark.loopscope(max_block=0.05)`` on the test (``max_block=None`` exempts it), the
``--loopscope-max-block=0.05`` option, the ``loopscope_max_block = 0.05`` ini setting.
Works with pytest-asyncio: detection starts before the test's fixtures make its loop and
ends after their teardown.  A block during the test or its fixtures' setup fails the test;
a block during their teardown is an error at teardown.  The report shows the stack frames
of the test and the application; ``--loopscope-full-stack`` (or ``--full-trace``) shows
pytest's, pluggy's, the event loop's and the standard library's too.

PYTEST_DONT_REWRITE: this module has no assertions for pytest to rewrite.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from .testing import BlockingRecorder, _format_blocks, detect_blocking

_OPTION = "--loopscope-max-block"
_INI = "loopscope_max_block"
#: The ini type ``float`` exists from pytest 8.4 on; before, the value is a string.
_INI_TYPE: Any = "float" if pytest.version_tuple >= (8, 4) else "string"
_FULL_STACK_HINT = "--loopscope-full-stack shows them"


@dataclass
class _Detection:
    """A test's detection: open from its setup to the end of its teardown."""

    stack: ExitStack
    recorder: BlockingRecorder


class _BadMarker(Exception):
    pass


_detection_key = pytest.StashKey[_Detection]()
_default_key = pytest.StashKey["float | None"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loopscope")
    group.addoption(
        _OPTION,
        type=float,
        default=None,
        metavar="SECONDS",
        help="fail a test when an event loop step blocks for SECONDS or longer "
        f"(overrides the {_INI} ini setting)",
    )
    group.addoption(
        "--loopscope-full-stack",
        action="store_true",
        default=False,
        help="show every frame of a blocking stack, pytest's and the event loop's too",
    )
    parser.addini(
        _INI,
        "fail a test when an event loop step blocks for this many seconds or longer",
        type=_INI_TYPE,
        default=None,
    )


def _ini_limit(config: pytest.Config) -> float | None:
    try:
        value = config.getini(_INI)
    except (TypeError, ValueError, pytest.UsageError) as exc:
        raise pytest.UsageError(f"{_INI} must be a number of seconds > 0: {exc}") from None
    if value is None or value == "" or value == []:
        return None
    try:
        limit = float(value)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{_INI} must be a number of seconds > 0; got {value!r}") from None
    if isinstance(value, bool) or not limit > 0:
        raise pytest.UsageError(f"{_INI} must be > 0 seconds; got {value!r}")
    return limit


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "loopscope(max_block=SECONDS): fail the test when its event loop is blocked for "
        "SECONDS or longer (None exempts the test)",
    )
    limit = config.getoption(_OPTION)
    if limit is not None and not limit > 0:
        raise pytest.UsageError(f"{_OPTION} must be > 0 seconds; got {limit}")
    ini_limit = _ini_limit(config)  # checked even when the option wins
    config.stash[_default_key] = ini_limit if limit is None else float(limit)


def _limit(item: pytest.Item) -> float | None:
    marker = item.get_closest_marker("loopscope")
    if marker is None:
        return item.config.stash.get(_default_key, None)
    usage = "use @pytest.mark.loopscope(max_block=SECONDS), or max_block=None to exempt the test"
    if set(marker.kwargs) - {"max_block"} or len(marker.args) + len(marker.kwargs) != 1:
        raise _BadMarker(usage)
    value = marker.kwargs["max_block"] if marker.kwargs else marker.args[0]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _BadMarker(f"loopscope max_block must be seconds > 0 or None; got {value!r}")
    return float(value)


def _report(item: pytest.Item, detection: _Detection, start: int) -> str:
    config = item.config
    return _format_blocks(
        detection.recorder.blocks[start:],
        detection.recorder.max_block,
        full_stack=bool(
            config.getoption("loopscope_full_stack") or config.getoption("fulltrace", False)
        ),
        hint=_FULL_STACK_HINT,
    )


# A plain implementation, not a wrapper: a wrapper that raises before it yields keeps the
# other plugins' setup wrappers from running, and their teardown then fails (KeyError).
# tryfirst: before pytest's own implementation sets up the fixtures, which make the loop.
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    error: str | None = None
    try:
        limit = _limit(item)
    except _BadMarker as exc:
        # A bad argument is this test's error, as for a missing fixture: the others still run.
        error = str(exc)
    else:
        if limit is None:
            return
        stack = ExitStack()
        try:
            recorder = stack.enter_context(detect_blocking(limit))
        except ValueError as exc:  # loopscope installed with a higher slow threshold
            error = str(exc)
        else:
            item.stash[_detection_key] = _Detection(stack, recorder)
    if error is not None:  # raised here, out of the except clause: no chained exception
        pytest.fail(f"{item.nodeid}: {error}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    detection = item.stash.get(_detection_key, None)
    if detection is None:
        return (yield)
    try:
        result = yield
    except BaseException:
        # The test failed (or skipped) on its own: the blocks, of its setup and call, go
        # into a section of its report rather than into a second failure.
        if detection.recorder.blocks:
            item.add_report_section("call", "loopscope", _report(item, detection, 0))
        raise
    if detection.recorder.blocks:
        pytest.fail(_report(item, detection, 0), pytrace=False)
    return result


# trylast: the innermost wrapper, closest to the fixtures' teardown.
@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    detection = item.stash.get(_detection_key, None)
    if detection is None:
        return (yield)
    # Only the blocks from here on are this phase's: the setup's and the call's went with
    # the call's report (or with a setup that failed).
    start = len(detection.recorder.blocks)
    try:
        result = yield
    finally:
        del item.stash[_detection_key]
        detection.stack.close()
    if len(detection.recorder.blocks) > start:
        pytest.fail(_report(item, detection, start), pytrace=False)
    return result
