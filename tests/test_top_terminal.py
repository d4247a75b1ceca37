"""``loopscope top`` on a real terminal: inside tmux, against the demo service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None and not os.environ.get("CI"), reason="needs tmux"
)

TIMEOUT = 30.0


def _start_service(loop_kind: str, metrics_port: int = 0) -> tuple[subprocess.Popen[str], dict]:
    """The demo service and its ready line (``port``, ``metrics_port``)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "loopscope.demo", "serve", "--port", "0",
         "--metrics-port", str(metrics_port), "--loop", loop_kind, "--json-logs"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        if '"demo_ready"' in line:
            return process, json.loads(line)
    process.kill()
    raise AssertionError("the demo service did not start")


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


class Tmux:
    """A tmux server of the test's own (its own socket), one session in it."""

    def __init__(self, command: str) -> None:
        self.socket = f"loopscope-test-{os.getpid()}"
        self._tmux("new-session", "-d", "-s", "top", "-x", "180", "-y", "45", command)

    def _tmux(self, *args: str) -> str:
        command = ["tmux", "-L", self.socket, "-f", os.devnull, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
        return result.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "top")

    def resize(self, columns: int, lines: int) -> None:
        self._tmux("resize-window", "-t", "top", "-x", str(columns), "-y", str(lines))

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "top", *keys)

    def wait_for(self, what: str, holds: Callable[[str], bool]) -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            screen = self.screen()
            if holds(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {what}; the screen:\n{screen}")
            time.sleep(0.1)

    def close(self) -> None:
        self._tmux("kill-server")


@pytest.fixture(name="tmux_top")
def fixture_tmux_top(loop_kind: str) -> Iterator[tuple[Tmux, list[subprocess.Popen[str]], dict]]:
    """The demo service on ``loop_kind``, and loopscope top attached to it in tmux."""
    service, ready = _start_service(loop_kind)
    services = [service]
    top = f"{sys.executable} -m loopscope top 127.0.0.1:{ready['metrics_port']} --interval 0.2"
    tmux = Tmux(f"{top}; echo top-exited-$?; sleep 60")
    try:
        yield tmux, services, ready
    finally:
        tmux.close()
        for process in services:
            _stop(process)


def test_top_in_a_terminal(
    tmux_top: tuple[Tmux, list[subprocess.Popen[str]], dict], loop_kind: str
) -> None:
    """The loop's row, a blocking location and the slow step's stack after a block; the keys
    work; the view follows a resize; the endpoint shown down when the service goes, back
    when it returns; q quits."""
    tmux, services, ready = tmux_top
    row = f"MainThread ({loop_kind})"
    tmux.wait_for("the loop's row", lambda s: row in s)
    with urllib.request.urlopen(f"http://127.0.0.1:{ready['port']}/block?ms=150", timeout=10):
        pass
    screen = tmux.wait_for("the block", lambda s: "stack of the latest" in s and "in _handle" in s)
    assert "loopscope/demo/service.py:" in screen and "in _blocking_sleep" in screen
    tmux.keys("p")
    tmux.wait_for("the pause", lambda s: "PAUSED" in s)
    tmux.keys("p", "s", "l")
    screen = tmux.wait_for("sort and loop", lambda s: "sort: utilization" in s and "loop: " in s)
    assert "PAUSED" not in screen and "lag p99 history" in screen
    tmux.resize(110, 40)  # narrower: the history columns go, the loop's row stays whole
    tmux.wait_for("the resize", lambda s: "lag p99 history" not in s and row in s)
    _stop(services[0])
    tmux.wait_for("the endpoint down", lambda s: "DOWN" in s and "connection refused" in s)
    services.append(_start_service(loop_kind, ready["metrics_port"])[0])
    tmux.wait_for("the endpoint back", lambda s: "DOWN" not in s and row in s)
    tmux.keys("q")
    tmux.wait_for("top quitting", lambda s: "top-exited-0" in s)
