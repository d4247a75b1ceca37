"""pytest starts, with loopscope's plugin, when loopscope was imported before it (as
``loopscope run`` does) and warnings are errors."""

from __future__ import annotations

import os
import sys

import pytest

#: Read at import, before conftest's autouse fixture clears the LOOPSCOPE_ variables.
_PURE_PYTHON = os.environ.get("LOOPSCOPE_PURE_PYTHON")

TESTS = """
import pytest

@pytest.mark.loopscope(max_block=None)
def test_marked():
    assert [1, 2] == [1, 2]

def test_loopscope_imported():
    import sys
    assert "loopscope" in sys.modules
"""


@pytest.fixture(name="strict_project")
def fixture_strict_project(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    """A project whose pytest configuration turns every warning into an error."""
    if _PURE_PYTHON is not None:
        monkeypatch.setenv("LOOPSCOPE_PURE_PYTHON", _PURE_PYTHON)
    pytester.makeini(
        """
        [pytest]
        filterwarnings = error
        addopts = --strict-markers --strict-config -p no:cacheprovider
        asyncio_default_fixture_loop_scope = function
        """
    )
    pytester.makepyfile(test_app=TESTS)
    return pytester


def _assert_clean_pass(result: pytest.RunResult, passed: int) -> None:
    output = "\n".join(result.outlines + result.errlines)
    assert "PytestAssertRewriteWarning" not in output, output
    assert result.ret == pytest.ExitCode.OK, output
    result.assert_outcomes(passed=passed)


def test_imported_before_pytest(strict_project: pytest.Pytester) -> None:
    """With loopscope imported first, pytest collects and passes with no rewrite warning."""
    result = strict_project.run(
        sys.executable,
        "-c",
        "import loopscope, pytest, sys; sys.exit(pytest.main(['-q']))",
        timeout=120,
    )
    _assert_clean_pass(result, passed=2)


def test_loopscope_run_pytest(strict_project: pytest.Pytester) -> None:
    """``loopscope run -- python -m pytest`` runs the tests, with loopscope installed."""
    strict_project.makepyfile(
        test_installed="""
        from loopscope import _installation

        def test_installed_at_start_up():
            assert _installation.current() is not None
        """
    )
    script = os.path.join(os.path.dirname(sys.executable), "loopscope")
    launcher = [script] if os.path.exists(script) else [sys.executable, "-m", "loopscope"]
    result = strict_project.run(
        *launcher, "run", "--", sys.executable, "-m", "pytest", "-q", timeout=120
    )
    _assert_clean_pass(result, passed=3)
