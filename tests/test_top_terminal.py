"""``loopscope top`` on a real terminal: inside tmux, against the demo service on both
loops at once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None and not os.environ.get("CI"), reason="needs tmux"
)

TIMEOUT = 30.0


def _spawn_service(loop_kind: str, metrics_port: int = 0) -> subprocess.Popen[str]:
    """The demo service on ``loop_kind``, starting."""
    return subprocess.Popen(
        [sys.executable, "-m", "loopscope.demo", "serve", "--port", "0",
         "--metrics-port", str(metrics_port), "--loop", loop_kind, "--json-logs"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip


def _ready(process: subprocess.Popen[str]) -> dict:
    """The ready line of a service (``port``, ``metrics_port``), once it serves."""
    assert process.stdout is not None
    for line in process.stdout:
        if '"demo_ready"' in line:
            return dict(json.loads(line))
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
        self.socket_path = self._tmux("display-message", "-p", "#{socket_path}").strip()

    def _tmux(self, *args: str) -> str:
        command = ["tmux", "-L", self.socket, "-f", os.devnull, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
        return result.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "top")

    def resize(self, columns: int, lines: int) -> None:
        self._tmux("resize-window", "-t", "top", "-x", str(columns), "-y", str(lines))

    def terminal_state(self) -> str:
        """Whether the pane is on the alternate screen, and whether its cursor shows."""
        return self._tmux("display-message", "-p", "-t", "top",
                          "alternate=#{alternate_on} cursor=#{cursor_flag}").strip()  # fmt: skip

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
        if self.socket_path:  # tmux leaves it behind
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)


@pytest.fixture(name="watching")
def fixture_watching(
    tmp_path: Path,
) -> Iterator[tuple[Tmux, dict[str, subprocess.Popen[str]], dict[str, dict]]]:
    """The demo service on each loop, and one loopscope top attached to both in tmux; once
    it quits, a second one, whose process id is in ``tmp_path / "top.pid"``."""
    services: dict[str, subprocess.Popen[str]] = {}
    ready: dict[str, dict] = {}
    tmux: Tmux | None = None
    try:
        for kind in ("asyncio", "uvloop"):  # both start at once
            services[kind] = _spawn_service(kind)
        for kind, process in services.items():
            ready[kind] = _ready(process)
        urls = " ".join(f"127.0.0.1:{ready[kind]['metrics_port']}" for kind in ready)
        top = f"{sys.executable} -m loopscope top {urls} --interval 0.2"
        second = f"sh -c 'echo $$ > {tmp_path / 'top.pid'}; exec {top}'"
        tmux = Tmux(f"{top}; echo top-exited-$?; {second}; echo top-stopped-$?; sleep 60")
        yield tmux, services, ready
    finally:
        if tmux is not None:
            tmux.close()
        for process in services.values():
            _stop(process)


def _block(ready: dict) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{ready['port']}/block?ms=400", timeout=10):
        pass


def test_top_in_a_terminal(
    watching: tuple[Tmux, dict[str, subprocess.Popen[str]], dict[str, dict]], tmp_path: Path
) -> None:
    """One top on both loops: each loop's row, and after a block on each, its location and
    the stack of its slow step; the keys work; the view follows a resize; a service that
    goes is shown down, and back when it returns; q quits; SIGTERM stops a top as cleanly,
    giving the terminal back as it was."""
    tmux, services, ready = watching
    rows = {kind: f"MainThread ({kind})" for kind in ready}
    tmux.wait_for("both loops' rows", lambda s: all(row in s for row in rows.values()))
    for kind in ("asyncio", "uvloop"):
        endpoint = f"127.0.0.1:{ready[kind]['metrics_port']}"
        _block(ready[kind])
        screen = tmux.wait_for(
            f"the block on {kind}",
            lambda s, e=endpoint: "stack of the latest (" in s and f"on {e} at" in s,
        )
        assert "loopscope/demo/service.py:" in screen and "in _blocking_sleep" in screen
        assert "in _handle" in screen
    tmux.keys("p")
    tmux.wait_for("the pause", lambda s: "PAUSED" in s)
    tmux.keys("p", "s", "l")
    screen = tmux.wait_for("sort and loop", lambda s: "sort: utilization" in s and "loop: " in s)
    assert "PAUSED" not in screen and "lag p99 history" in screen
    tmux.keys("l", "l")  # the other loop, then every loop again
    tmux.wait_for("every loop", lambda s: "loop: " not in s and rows["asyncio"] in s)
    tmux.resize(110, 40)  # narrower: the history columns go, the loops' rows stay whole
    tmux.wait_for("the resize", lambda s: "lag p99 history" not in s and rows["uvloop"] in s)
    _stop(services["uvloop"])
    screen = tmux.wait_for("uvloop's service down", lambda s: "connection refused" in s)
    assert "DOWN 127.0.0.1:" in screen and rows["asyncio"] in screen
    services["uvloop"] = _spawn_service("uvloop", ready["uvloop"]["metrics_port"])
    tmux.wait_for("the service back", lambda s: "DOWN" not in s and rows["uvloop"] in s)
    tmux.keys("q")
    tmux.wait_for("top quitting", lambda s: "top-exited-0" in s)
    assert tmux.terminal_state() == "alternate=0 cursor=1"
    pid_file = tmp_path / "top.pid"
    tmux.wait_for("the second top", lambda s: pid_file.exists() and "top-exited-0" not in s)
    tmux.wait_for("its loops", lambda s: all(row in s for row in rows.values()))
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    tmux.wait_for("top stopped", lambda s: "top-stopped-" in s)
    assert "top-stopped-0" in tmux.screen()
    assert tmux.terminal_state() == "alternate=0 cursor=1"
