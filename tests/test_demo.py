"""The demo that `make demo` runs: it starts, shows loopscope top's lines with the blocking
line, and stops everything it started however it is stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

#: How each run of the demo is stopped: SIGTERM (a service manager, kill) on one loop,
#: SIGINT (Ctrl-C, which a terminal sends to its whole foreground process group) on the
#: other.
STOPPED_BY = {"uvloop": signal.SIGTERM, "asyncio": signal.SIGINT}


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_demo_runs_and_stops(loop_kind: str) -> None:
    """The demo prints top's lines and a slow step with its location; stopped by a signal
    (SIGTERM to it alone, or SIGINT to its process group as a terminal's Ctrl-C), it exits
    cleanly, no request failed, and its service is gone too."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "loopscope.demo", "--loop", loop_kind, "--duration", "0",
         "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal gives
    )  # fmt: skip
    assert demo.stdout is not None and demo.stderr is not None
    lines: list[str] = []
    service_pid = None
    # Read until the first slow step is shown, for at most a minute.
    timer = threading.Timer(60, demo.kill)
    timer.start()
    try:
        for line in demo.stdout:
            lines.append(line)
            found = re.search(r"demo service \(pid (\d+)\)", line)
            if found:
                service_pid = int(found.group(1))
            if line.startswith("  slow step"):
                break
        assert service_pid is not None, "".join(lines)
        if STOPPED_BY[loop_kind] == signal.SIGINT:
            os.killpg(demo.pid, signal.SIGINT)
        else:
            demo.send_signal(STOPPED_BY[loop_kind])
        rest, err = demo.communicate(timeout=30)
    finally:
        timer.cancel()
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        if service_pid is not None and not _gone(service_pid, 10):
            os.kill(service_pid, signal.SIGKILL)
            pytest.fail("the demo service was left running")
    out = "".join(lines) + rest
    assert demo.returncode == 0, out + err
    assert f"({loop_kind} loop)" in out
    assert f"loop=MainThread ({loop_kind}) lag_p50=" in out and "lag_p99=" in out
    assert "at loopscope/demo/service.py:" in out
    assert "in _blocking_sleep" in out or "in _burn_cpu" in out
    assert " 0 errors" in out
    assert "Traceback" not in out + err
