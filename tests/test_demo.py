"""The demo that `make demo` runs: it starts, shows live figures and finds the blocking line."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs(loop_kind: str) -> None:
    """Six seconds of the demo print the table, a slow step with its location, no error."""
    result = subprocess.run(
        [
            sys.executable, "-m", "loopscope.demo", "--loop", loop_kind,
            "--duration", "6", "--metrics-port", "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"({loop_kind} loop)" in out
    assert "req/s" in out and "lag p99" in out
    assert "slow step:" in out
    assert "blocked at loopscope/demo/service.py:" in out
    assert "in _blocking_sleep" in out or "in _burn_cpu" in out
    assert "0 errors" in out
    assert "Traceback" not in out + result.stderr
