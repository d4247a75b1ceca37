"""The demo that `make demo` runs: it starts, shows loopscope top's figures and finds the
blocking line, and stops everything it started however it is stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest


def test_demo_runs(loop_kind: str) -> None:
    """Four seconds of the demo print top's lines, a slow step with its location, no error."""
    result = subprocess.run(
        [
            sys.executable, "-m", "loopscope.demo", "--loop", loop_kind,
            "--duration", "4", "--metrics-port", "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"({loop_kind} loop)" in out
    assert f"loop=MainThread ({loop_kind}) lag_p50=" in out and "lag_p99=" in out
    assert "slow step" in out
    assert "at loopscope/demo/service.py:" in out
    assert "in _blocking_sleep" in out or "in _burn_cpu" in out
    assert " 0 errors" in out
    assert "Traceback" not in out + result.stderr


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_everything(signum: signal.Signals) -> None:
    """SIGTERM (or SIGINT, as Ctrl-C sends) to the demo alone stops its service too."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "loopscope.demo", "--loop", "asyncio", "--duration", "0",
         "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    service_pid = None
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            found = re.search(r"demo service \(pid (\d+)\)", line)
            if found:
                service_pid = int(found.group(1))
                break
        assert service_pid is not None, "the demo did not start its service"
        demo.send_signal(signum)
        assert demo.wait(30) == 0
        assert _gone(service_pid, 10), "the demo service was left running"
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        if service_pid is not None and not _gone(service_pid, 0.1):
            os.kill(service_pid, signal.SIGKILL)
        for stream in (demo.stdout, demo.stderr):
            if stream is not None:
                stream.close()
