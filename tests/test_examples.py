"""The runnable examples in examples/, each run for real on loopback.

(``examples/gunicorn.conf.py`` and ``examples/zero_code_asgi.py`` run in test_workers.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_workers import free_port, http_get, parse, stop_process, value

ROOT = Path(__file__).resolve().parent.parent
MAIN = {"loop": "MainThread"}
DEFAULT = {"loop": "MainThread", "executor": "default"}


def example_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSCOPE_")}
    env.update(PYTHONPATH=str(ROOT), LOOPSCOPE_SLOW_EVENTS="false")
    return env


@pytest.fixture(name="server")
def fixture_server(request: pytest.FixtureRequest, loop_kind: str, tmp_path: Path) -> Iterator[int]:
    """The example named by the test's parameter, serving on a free loopback port."""
    port = free_port()
    if request.param == "fastapi":
        pytest.importorskip("fastapi")
        command = [
            sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--host", "127.0.0.1",
            "--port", str(port), "--loop", loop_kind, "--log-level", "warning",
        ]  # fmt: skip
    else:
        command = [
            sys.executable, "-m", "examples.aiohttp_app", "--port", str(port),
            "--loop", loop_kind,
        ]  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=example_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield port
    finally:
        stop_process(process)


@pytest.mark.parametrize("server", ["fastapi", "aiohttp"], indirect=True)
class TestWebExamples:
    """The FastAPI (lifespan) and aiohttp (on_startup) examples."""

    def test_block_offload_and_metrics(self, server: int, loop_kind: str) -> None:
        """A blocking request is a slow step, an offloaded one an executor call, both on
        the app's own /metrics route, on the loop the server runs."""
        deadline = time.monotonic() + 30
        base = f"http://127.0.0.1:{server}"
        http_get(f"{base}/block", deadline)
        http_get(f"{base}/offload", deadline)
        samples = parse(http_get(f"{base}/metrics", deadline).decode())
        assert value(samples, "asyncio_loop_slow_callbacks_total", **MAIN) >= 1
        assert value(samples, "asyncio_executor_run_duration_seconds_count", **DEFAULT) == 1
        assert value(samples, "asyncio_executor_run_duration_seconds_sum", **DEFAULT) >= 0.3
        kinds = {
            dict(labels)["implementation"]
            for (name, labels) in samples
            if name == "asyncio_loop_info" and dict(labels)["loop"] == "MainThread"
        }
        assert kinds == {loop_kind}


class TestScriptExample:
    """examples/plain_asyncio.py on both loops."""

    def test_plain_script(self, loop_kind: str) -> None:
        """It runs to the end and prints what it measured."""
        done = subprocess.run(
            [sys.executable, "-m", "examples.plain_asyncio", "--loop", loop_kind,
             "--seconds", "0.2"],
            cwd=ROOT, env=example_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        figures = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines())
        assert figures['asyncio_loop_slow_callbacks_total{loop="MainThread"}'] == "1"
        files = 'asyncio_executor_run_duration_seconds_count{loop="MainThread",executor="files"}'
        assert int(figures[files]) >= 3
