"""The pytest plugin and loopscope.testing: tests fail when their loop blocks."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time

import pluggy
import pytest
import uvloop

import loopscope
from loopscope.testing import Block, assert_no_blocking, detect_blocking, format_blocks

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

#: A test module with one async test, marked with a 50 ms limit, that blocks for 100 ms.
MARKED_TEST = """
import asyncio, time, pytest

@pytest.mark.asyncio
@pytest.mark.loopscope(max_block=0.05)
async def test_marked_block():
    time.sleep(0.1)
    await asyncio.sleep(0)
"""


#: Read at import, before conftest's autouse fixture clears the LOOPSCOPE_ variables: the
#: projects' pytest runs use the hot path (C or pure Python) of the run that tests them.
_PURE_PYTHON = os.environ.get("LOOPSCOPE_PURE_PYTHON")


@pytest.fixture(name="project")
def fixture_project(
    pytester: pytest.Pytester, loop_kind: str, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    """A project whose async tests run on the loop under test."""
    if _PURE_PYTHON is not None:
        monkeypatch.setenv("LOOPSCOPE_PURE_PYTHON", _PURE_PYTHON)
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
        """With the option the blocking test fails, listing its frames and counting pytest's."""
        result = project.runpytest_subprocess("-p", "asyncio", "--loopscope-max-block=0.05")
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(
            [
                "*test_blocks*",
                "event loop blocked for 0.05 s or longer (1 time(s)):",
                "- * s on loop 'MainThread' in task *, at test_app.py:* in slow_lookup",
                "      */test_app.py:* in test_blocks",
                "      */test_app.py:* in slow_lookup",
                "      (* frames of pytest, pluggy, *hidden; --loopscope-full-stack shows them)",
            ]
        )
        result.stdout.no_fnmatch_line("*pluggy*in _multicall")

    def test_marker(self, project: pytest.Pytester) -> None:
        """The marker turns detection on for one test."""
        project.makepyfile(test_marked=MARKED_TEST)
        result = project.runpytest_subprocess("-p", "asyncio", "test_marked.py")
        result.assert_outcomes(failed=1)

    def test_bad_option(self, project: pytest.Pytester) -> None:
        """A non-positive limit is a usage error naming the option."""
        result = project.runpytest_subprocess("--loopscope-max-block=-1")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*--loopscope-max-block must be > 0*"])


class TestIniSetting:
    """loopscope_max_block in the configuration file."""

    def test_ini_sets_limit(self, project: pytest.Pytester) -> None:
        """loopscope_max_block in pyproject.toml fails the blocking test, as the option does."""
        project.makepyprojecttoml("[tool.pytest.ini_options]\nloopscope_max_block = 0.05\n")
        result = project.runpytest_subprocess("-p", "asyncio", "--strict-config")
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(["*event loop blocked for 0.05 s or longer*"])

    def test_option_wins_over_ini_and_marker_over_both(self, project: pytest.Pytester) -> None:
        """The option overrides the ini setting, and a test's marker overrides the option."""
        project.makepyprojecttoml("[tool.pytest.ini_options]\nloopscope_max_block = 0.05\n")
        project.makepyfile(test_marked=MARKED_TEST)
        result = project.runpytest_subprocess(
            "-p", "asyncio", "--strict-config", "--loopscope-max-block=10"
        )
        result.assert_outcomes(passed=3, failed=1)
        result.stdout.fnmatch_lines(["FAILED test_marked.py::test_marked_block*"])

    @pytest.mark.parametrize("value", ["abc", "-1"])
    def test_bad_ini_value(self, pytester: pytest.Pytester, value: str) -> None:
        """A bad loopscope_max_block is a usage error naming the setting."""
        pytester.makeini(f"[pytest]\nloopscope_max_block = {value}\n")
        result = pytester.runpytest_subprocess()
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*loopscope_max_block must be*"])


class TestTeardown:
    """Blocks during the fixtures' teardown."""

    def test_blocking_fixture_teardown_is_a_teardown_error(self, project: pytest.Pytester) -> None:
        """Teardown blocks are a teardown error; a failing test's blocks go in a report section."""
        project.makepyfile(
            test_fixture="""
            import asyncio, time
            import pytest, pytest_asyncio

            def slow_close():
                time.sleep(0.1)

            @pytest_asyncio.fixture
            async def connection():
                yield "connection"
                slow_close()

            @pytest.mark.asyncio
            async def test_uses_connection(connection):
                await asyncio.sleep(0)

            @pytest.mark.asyncio
            async def test_fails_and_blocks():
                time.sleep(0.1)
                raise ValueError("broken")
            """
        )
        result = project.runpytest_subprocess(
            "-p", "asyncio", "--loopscope-max-block=0.05", "test_fixture.py"
        )
        result.assert_outcomes(passed=1, failed=1, errors=1)
        result.stdout.fnmatch_lines(
            [
                "*ERROR at teardown of test_uses_connection*",
                "event loop blocked for 0.05 s or longer (1 time(s)):",
                "*test_fixture.py:*in slow_close",
                "*FAILURES*",
                "*test_fails_and_blocks*",
                "*ValueError: broken",
                "*Captured loopscope call*",
                "event loop blocked for 0.05 s or longer (1 time(s)):",
            ]
        )


class TestBadMarker:
    """A marker with a bad argument."""

    def test_bad_marker_errors_that_test_once(self, pytester: pytest.Pytester) -> None:
        """Each badly marked test has one clean error at setup; the other tests run."""
        pytester.makepyfile(
            test_marks="""
            import pytest

            @pytest.mark.loopscope(max_block="x")
            def test_bad_value():
                pass

            @pytest.mark.loopscope(max_blok=0.1)
            def test_bad_keyword():
                pass

            def test_fine():
                pass
            """
        )
        result = pytester.runpytest_subprocess()
        result.assert_outcomes(passed=1, errors=2)
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines(
            [
                "*ERROR at setup of test_bad_value*",
                "test_marks.py::test_bad_value: loopscope max_block must be seconds > 0 "
                "or None; got 'x'",
                "*ERROR at setup of test_bad_keyword*",
                "test_marks.py::test_bad_keyword: use @pytest.mark.loopscope(max_block=*",
            ]
        )
        output = result.stdout.str()
        assert output.count("ERROR at") == 2
        assert "KeyError" not in output
        assert "Traceback" not in output


def _entry(path: str, line: int, function: str) -> str:
    return f"{path}:{line} in {function}"


#: Frames of pytest, pluggy, the loops, loopscope and the standard library.
LIBRARY_STACK = [
    _entry("<frozen runpy>", 198, "_run_module_as_main"),
    _entry(os.path.join(os.path.dirname(pytest.__file__), "__main__.py"), 9, "<module>"),
    _entry(os.path.join(os.path.dirname(pluggy.__file__), "_callers.py"), 103, "_multicall"),
    _entry(asyncio.base_events.__file__, 1922, "_run_once"),
    _entry(os.path.join(os.path.dirname(uvloop.__file__), "loop.pyx"), 480, "_on_idle"),
    _entry(os.path.join(os.path.dirname(loopscope.__file__), "_probe.py"), 191, "run_forever"),
]
#: Frames of a test and of the application it tests.
APPLICATION_STACK = [
    _entry(__file__, 10, "test_handler"),
    _entry("/srv/app/handlers.py", 42, "get_user"),
]


class TestStackDisplay:
    """The blocking stack in a report: the application's frames first."""

    def _block(self, stack: list[str]) -> Block:
        return Block("MainThread", 0.2, "task 'Task-1'", "handlers.py:42 in get_user", stack)

    def test_hides_runner_and_loop_frames(self) -> None:
        """Non-application frames are counted, not listed, unless no application frame remains."""
        blocks = [self._block(LIBRARY_STACK + APPLICATION_STACK), self._block(LIBRARY_STACK)]
        lines = format_blocks(blocks, 0.05).splitlines()
        assert lines[2:5] == [
            *(f"      {entry}" for entry in APPLICATION_STACK),
            "      (6 frames of pytest, pluggy, asyncio, uvloop, loopscope and the standard "
            "library hidden; full_stack=True shows them)",
        ]
        assert lines[6:] == [f"      {entry}" for entry in LIBRARY_STACK]

    def test_full_stack(self) -> None:
        """full_stack=True lists every frame, and nothing hidden."""
        stack = LIBRARY_STACK + APPLICATION_STACK
        report = format_blocks([self._block(stack)], 0.05, full_stack=True)
        assert report.splitlines()[2:] == [f"      {entry}" for entry in stack]

    def test_full_stack_option(self, project: pytest.Pytester) -> None:
        """--loopscope-full-stack lists pytest's and the loop's frames too."""
        result = project.runpytest_subprocess(
            "-p", "asyncio", "--loopscope-max-block=0.05", "--loopscope-full-stack"
        )
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(["*pluggy*in _multicall", "*test_app.py:* in slow_lookup"])
        result.stdout.no_fnmatch_line("*frames of * hidden*")


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
