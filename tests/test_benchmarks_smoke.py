"""The benchmark's quick mode runs to its table (a smoke test: no figure is checked)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_benchmark(module: str, *args: str) -> str:
    """``python -m module args... --python <this interpreter>`` from the checkout; its output."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, "--python", sys.executable],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(not (ROOT / "benchmarks" / "__main__.py").exists(), reason="no benchmarks/")
def test_quick_mode_prints_the_table() -> None:
    out = _run_benchmark(
        "benchmarks",
        "--quick",
        "--only",
        "storm,callbacks,http,accuracy,scrape",
    )
    assert "| workload" in out and "| loop" in out, out
    assert "task-step storm" in out and "uninstrumented" in out, out
    assert "accuracy" in out and "scrape" in out, out
    assert "paired turns" in out and "call_later chains" in out, out
    if shutil.which("wrk") is not None:  # CI installs it; the HTTP workload needs it
        assert "3 HTTP aiohttp" in out and "pair ratio" in out, out
    assert "targets:" in out, out


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind (CI installs it)")
def test_instructions_per_request_runs() -> None:
    """benchmarks/http_icount.py runs its callgrind measurement to its table, with the
    simulated caches' table too."""
    out = _run_benchmark(
        "benchmarks.http_icount",
        "--requests",
        "40",
        "--warmup",
        "20",
        "--idle",
        "0.5",
        "--connections",
        "4",
        "--variants",
        "none,loopscope",
        "--caches",
    )
    assert "loop Ir/req" in out and "linearity" in out, out
    assert "added per request vs none" in out and "loopscope" in out, out
    caches = out.split("simulated caches and branch predictors")[-1]
    assert re.search(r"^  loopscope +[\d,]+ \([+-]\d+\.\d+%\)", caches, re.MULTILINE), out
