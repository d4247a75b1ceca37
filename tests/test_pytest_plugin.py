"""The pytest plugin and loopscope.testing: tests fail when their loop blocks."""

from __future__ import annotations

import asyncio
import textwrap
import time

import pytest

import loopscope
from loopscope.testing import assert_no_blocking, detect_blocking

from .conftest import make_loop

TESTS = """
import asyncio, time
import pytest

def slow_lookup():
    time.sleep(0.2)

@pytest.mark.asyncio
async def test_blocks():
    slow_lookup()
    await asyncio.sleep(0)

@pytest.mark.asyncio
async def test_fine():
    await asyncio.sleep(0.01)

@pytest.mark.asyncio
@pytest.mark.loopscope(max_block=None)
async def test_exempt():
    slow_lookup()
"""


@pytest.fixture(name="project")
def fixture_project(pytester: pytest.Pytester, loop_kind: str) -> pytest.Pytester:
    """A project whose async tests run on the loop under test."""
    pytester.makeconftest(
        textwrap.dedent(
            f"""
            import asyncio
            def pytest_asyncio_loop_factories(config, item):
                if {loop_kind!r} == "uvloop":
                    import uvloop
                    return {{"uvloop": uvloop.new_event_loop}}
                return {{"asyncio": asyncio.new_event_loop}}
            """
        )
    )
    pytester.makepyfile(test_app=TESTS)
    return pytester


class TestPlugin:
    """--loopscope-max-block and @pytest.mark.loopscope."""

    def test_off_by_default(self, project: pytest.Pytester) -> None:
        """Without the option or a marker every test passes."""
        result = project.runpytest_subprocess("-p", "asyncio")
        result.assert_outcomes(passed=3)

    def test_option_fails_blocking_test(self, project: pytest.Pytester) -> None:
        """With the option the blocking test fails, showing the blocking line."""
        result = project.runpytest_subprocess("-p", "asyncio", "--loopscope-max-block=0.05")
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(
            [
                "*event loop blocked longer than 0.05 s*",
                "*test_app.py:*in slow_lookup*",
            ]
        )
        assert "test_blocks" in "\n".join(result.stdout.lines)

    def test_marker(self, project: pytest.Pytester) -> None:
        """The marker turns detection on for one test."""
        project.makepyfile(
            test_marked="""
            import time, pytest, asyncio

            @pytest.mark.asyncio
            @pytest.mark.loopscope(max_block=0.05)
            async def test_marked_block():
                time.sleep(0.1)
                await asyncio.sleep(0)
            """
        )
        result = project.runpytest_subprocess("-p", "asyncio", "test_marked.py")
        result.assert_outcomes(failed=1)

    def test_bad_option(self, project: pytest.Pytester) -> None:
        """A non-positive limit is a usage error naming the option."""
        result = project.runpytest_subprocess("--loopscope-max-block=-1")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*--loopscope-max-block must be > 0*"])


class TestTestingHelpers:
    """loopscope.testing used directly."""

    def test_assert_no_blocking_raises(self, loop_kind: str) -> None:
        """A 100 ms block inside the block raises AssertionError with the stack."""

        def sync_client_call() -> None:
            time.sleep(0.1)

        async def main() -> None:
            sync_client_call()

        with pytest.raises(AssertionError, match="sync_client_call"):  # noqa: SIM117
            with assert_no_blocking(max_block=0.05):
                loop = make_loop(loop_kind)
                loop.run_until_complete(main())
                loop.close()

    def test_detect_blocking_quiet_loop(self, loop_kind: str) -> None:
        """A loop that never blocks records nothing."""
        with detect_blocking(0.05) as recorder:
            loop = make_loop(loop_kind)
            loop.run_until_complete(asyncio.sleep(0.1))
            loop.close()
        assert recorder.blocks == []

    def test_refuses_higher_installed_threshold(self) -> None:
        """An installation with a higher threshold cannot see smaller blocks: refused."""
        loopscope.install(
            slow_threshold=0.5, registry=__import__("prometheus_client").CollectorRegistry()
        )
        with pytest.raises(ValueError, match="slow_threshold"), detect_blocking(0.05):
            pass
