"""CPython's own asyncio tests pass the same with loopscope installed as without it.

Runs scripts/cpython_asyncio_suite.py for the interpreter running pytest: the eleven core
modules of test.test_asyncio, twice (40 to 85 s per interpreter on two idle cores), with
loopscope on the hot path this run of pytest uses (``LOOPSCOPE_PURE_PYTHON`` is passed on;
every other ``LOOPSCOPE_*`` variable is not).
``CPYTHON_ASYNCIO_SUITE=quick`` runs a smaller selection (the two big modules cut down to
a few classes), ``CPYTHON_ASYNCIO_SUITE=off`` skips it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopscope import _hotpath

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cpython_asyncio_suite.py"


def test_nothing_is_allowed_to_differ() -> None:
    """The shipped list of tests allowed to differ is empty (docs/transparency.md)."""
    entries = [
        line
        for line in (SCRIPT.parent / "cpython_asyncio_allowed.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert entries == []


def _stdlib_tests_present() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("test.test_asyncio") is not None
    except ImportError:
        return False


@pytest.mark.skipif(not _stdlib_tests_present(), reason="this Python has no test.test_asyncio")
class TestCPythonAsyncioSuite:
    """The sets of passing CPython asyncio tests with and without loopscope are equal."""

    def test_same_tests_pass(self, tmp_path: Path) -> None:
        """No test passes differently, except as listed in the allowed list (empty)."""
        mode = os.environ.get("CPYTHON_ASYNCIO_SUITE", "full")
        if mode == "off":
            pytest.skip("CPYTHON_ASYNCIO_SUITE=off")
        report = tmp_path / "suite.json"
        args = [sys.executable, str(SCRIPT), "--json", str(report)]
        if mode == "quick":
            args.append("--quick")
        # loopscope's own defaults, on the hot path this run of the suite tests.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("LOOPSCOPE_") or k == "LOOPSCOPE_PURE_PYTHON"
        }
        proc = subprocess.run(
            args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False
        )
        print(proc.stdout[-6000:])
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        result = json.loads(report.read_text())
        assert result["unexplained"] == [] and result["crashes"] == []
        # The comparison means something only if many tests ran and passed in both modes,
        # and loopscope really instrumented the loops the tests made.
        assert result["passed"]["plain"] > 500
        slack = len(result["allowed"]) + len(result["flaky"])
        assert result["passed"]["loopscope"] >= result["passed"]["plain"] - slack
        assert result["loops_instrumented"] > 100
        assert result["hot_path"] == ("pure-Python" if _hotpath.twin is _hotpath.pure else "C")
