"""Several worker processes on loopback: every worker's loop counted once, none lost.

Real servers: gunicorn with uvicorn workers and uvicorn --workers under ``loopscope run``
(the supervising process serves /metrics), and aiohttp's gunicorn worker instrumented from
the app (any worker's /metrics route answers).  Their figures merge through
``LOOPSCOPE_MULTIPROCESS_DIR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import loopscope
from loopscope import _port_sharing

from .ports import free_port

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http_get(url: str, deadline: float) -> bytes:
    """GET ``url``, retrying connection errors until ``deadline``."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return bytes(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def parse(text: str) -> Samples:
    """Exposition text as {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0.0 when absent."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Kill a process started in its own session, with every process of that session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session (so that teardown reaches its workers)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


@dataclass
class Fleet:
    """A running multi-worker server and where to look at it."""

    process: subprocess.Popen[bytes]
    http_port: int
    metrics_url: str
    directory: Path
    log: Path
    seen: set[int] = field(default_factory=set)

    #: Only the port is set: the directory is the one the workers make when they join the
    #: worker that serves it, and that one adds its own file at its next scrape.
    port_only: bool = False

    def worker_pids(self) -> set[int]:
        """Processes other than the one started that wrote a figures file, alive or not."""
        pids = set()
        if self.port_only:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.metrics_url, timeout=5).read()
        for path in self.directory.glob("loopscope-*-*.json"):
            pid = int(path.name.split("-")[1])
            if pid != self.process.pid:
                pids.add(pid)
        return pids | self.seen

    def scrape(self, deadline: float) -> Samples:
        return parse(http_get(self.metrics_url, deadline).decode())

    def fail(self, what: str) -> None:
        pytest.fail(f"{what}; server log:\n{self.log.read_text(errors='replace')[-4000:]}")


def base_env(directory: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSCOPE_")}
    env.update(
        LOOPSCOPE_MULTIPROCESS_DIR=str(directory),
        LOOPSCOPE_SLOW_THRESHOLD="0.2",
        LOOPSCOPE_EVENTS="off",
        PYTHONPATH=str(ROOT),
    )
    return env


def loopscope_run(port: int) -> list[str]:
    return [sys.executable, "-m", "loopscope", "run", "--port", str(port), "--"]


def gunicorn_control(tmp_path: Path) -> list[str]:
    from gunicorn.config import KNOWN_SETTINGS

    names = {s.name for s in KNOWN_SETTINGS}
    return ["--control-socket", str(tmp_path / "ctl")] if "control_socket" in names else []


@pytest.fixture(name="fleet")
def fixture_fleet(
    request: pytest.FixtureRequest, loop_kind: str, tmp_path: Path
) -> Iterator[Fleet]:
    """The server named by the test's parameter, with the loop under test."""
    server: str = request.param
    if "gunicorn" in server:
        pytest.importorskip("gunicorn")
    if server in ("gunicorn-uvicorn", "gunicorn-port"):
        pytest.importorskip("uvicorn_worker")
    directory = tmp_path / "mp"
    directory.mkdir()
    http_port, metrics_port = free_port(), free_port()
    env = base_env(directory)
    log = tmp_path / "server.log"
    if server == "gunicorn-uvicorn":
        # examples/gunicorn.conf.py, as its docstring runs it.
        worker = "UvicornWorker" if loop_kind == "uvloop" else "UvicornH11Worker"
        env.update(
            GUNICORN_BIND=f"127.0.0.1:{http_port}",
            GUNICORN_WORKERS=str(WORKERS),
            GUNICORN_WORKER_CLASS=f"uvicorn_worker.{worker}",
        )
        command = [
            *loopscope_run(metrics_port), sys.executable, "-m", "gunicorn",
            "-c", "examples/gunicorn.conf.py", *gunicorn_control(tmp_path),
            "examples.zero_code_asgi:app",
        ]  # fmt: skip
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    elif server == "uvicorn-workers":
        command = [
            *loopscope_run(metrics_port), sys.executable, "-m", "uvicorn",
            "--workers", str(WORKERS), "--loop", loop_kind, "--port", str(http_port),
            "--host", "127.0.0.1", "--log-level", "warning", "--timeout-graceful-shutdown", "3",
            "examples.zero_code_asgi:app",
        ]  # fmt: skip
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    elif server == "uvicorn-port":
        # One port setting, no shared directory, no launcher: the command line.
        env.pop("LOOPSCOPE_MULTIPROCESS_DIR")
        env["LOOPSCOPE_PORT"] = str(metrics_port)
        factory = "new_uvloop_event_loop" if loop_kind == "uvloop" else "new_event_loop"
        command = [
            sys.executable, "-m", "uvicorn", "--workers", str(WORKERS),
            "--loop", f"loopscope:{factory}", "--port", str(http_port), "--host", "127.0.0.1",
            "--log-level", "warning", "--timeout-graceful-shutdown", "3",
            "examples.zero_code_asgi:app",
        ]  # fmt: skip
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    elif server == "gunicorn-port":
        # gunicorn -w 4 with uvicorn workers and an app that calls install() at start-up.
        env.pop("LOOPSCOPE_MULTIPROCESS_DIR")
        env["LOOPSCOPE_PORT"] = str(metrics_port)
        worker = "UvicornWorker" if loop_kind == "uvloop" else "UvicornH11Worker"
        command = [
            sys.executable, "-m", "gunicorn", "-w", str(WORKERS),
            "-k", f"uvicorn_worker.{worker}", "-b", f"127.0.0.1:{http_port}",
            "--graceful-timeout", "3", *gunicorn_control(tmp_path),
            "tests.installing_asgi_app:app",
        ]  # fmt: skip
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    else:
        worker = "GunicornUVLoopWebWorker" if loop_kind == "uvloop" else "GunicornWebWorker"
        command = [
            sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-k", f"aiohttp.worker.{worker}",
            "-b", f"127.0.0.1:{http_port}", "--graceful-timeout", "3",
            *gunicorn_control(tmp_path), "examples.aiohttp_app:make_app()",
        ]  # fmt: skip
        metrics_url = f"http://127.0.0.1:{http_port}/metrics"
    process = start(command, env, log)
    if server.endswith("-port"):
        # The workers' group is named after their parent, the process started here.
        directory = Path(_port_sharing.base_directory()) / (
            f"group-{process.pid}-127.0.0.1-{metrics_port}.d"
        )
    try:
        yield Fleet(
            process, http_port, metrics_url, directory, log, port_only=server.endswith("-port")
        )
    finally:
        stop_process(process)
        if "Traceback" in log.read_text(errors="replace"):
            pytest.fail(f"a process failed; server log:\n{log.read_text(errors='replace')[-4000:]}")


def _fetch_all(fleet: Fleet, path: str, count: int, deadline: float) -> list[int]:
    """``count`` concurrent requests; the worker pids that answered."""
    url = f"http://127.0.0.1:{fleet.http_port}{path}"
    with ThreadPoolExecutor(count) as pool:
        bodies = list(pool.map(lambda _: http_get(url, deadline), range(count)))
    return [int(body.decode().split("pid=")[1].strip('"}')) for body in bodies]


def _wait_for(fleet: Fleet, deadline: float, what: str, predicate: object) -> Samples:
    assert callable(predicate)
    while True:
        samples = fleet.scrape(deadline)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            fleet.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


CUMULATIVE = ("_total", "_count", "_sum", "_bucket")
# prometheus_client's own process_* and python_* figures are per process, not merged.
LOOPSCOPE_FAMILIES = ("asyncio_", "process_context_switches")


@pytest.mark.parametrize(
    "fleet",
    ["gunicorn-uvicorn", "uvicorn-workers", "aiohttp-gunicorn", "uvicorn-port", "gunicorn-port"],
    indirect=True,
)
class TestWorkers:
    """Figures of every worker add up, survive a worker's death and never go backwards."""

    def test_every_worker_counted_once(self, fleet: Fleet, loop_kind: str) -> None:
        """Offloaded and blocking requests across four workers are all in the merged totals,
        exactly once, and a killed worker's figures stay after it is replaced."""
        deadline = time.monotonic() + 45
        while len(fleet.worker_pids()) < WORKERS:
            if time.monotonic() > deadline or fleet.process.poll() is not None:
                fleet.fail("the workers did not start")
            time.sleep(0.1)
        http_get(f"http://127.0.0.1:{fleet.http_port}/", deadline)
        before = fleet.scrape(deadline)
        slow_before = value(before, "asyncio_loop_slow_callbacks_total", loop="MainThread")
        offloads = {"loop": "MainThread", "executor": "default"}
        assert value(before, "asyncio_executor_run_duration_seconds_count", **offloads) == 0

        offloaded = _fetch_all(fleet, "/offload", WORKERS, deadline)
        blocked = _fetch_all(fleet, "/block", WORKERS, deadline)
        served = set(offloaded) | set(blocked)
        assert served <= fleet.worker_pids()

        def settled(samples: Samples) -> bool:
            return (
                value(samples, "asyncio_executor_run_duration_seconds_count", **offloads) >= WORKERS
                and value(samples, "asyncio_loop_slow_callbacks_total", loop="MainThread")
                >= slow_before + WORKERS
            )

        after = _wait_for(fleet, deadline, "the requests' figures", settled)
        assert value(after, "asyncio_executor_run_duration_seconds_count", **offloads) == WORKERS
        assert value(after, "asyncio_executor_queue_delay_seconds_count", **offloads) == WORKERS
        kinds = {
            dict(labels).get("implementation")
            for (name, labels), v in after.items()
            if name == "asyncio_loop_info" and dict(labels)["loop"] == "MainThread" and v == 1
        }
        assert kinds == {loop_kind}

        victim = blocked[0]
        old_workers = fleet.worker_pids()
        fleet.seen |= old_workers
        os.kill(victim, signal.SIGKILL)
        while not (fleet.worker_pids() - old_workers):
            if time.monotonic() > deadline:
                fleet.fail("no worker replaced the killed one")
            time.sleep(0.1)
        final = fleet.scrape(deadline)
        for key, old in after.items():
            if key[0].startswith(LOOPSCOPE_FAMILIES) and key[0].endswith(CUMULATIVE):
                assert final.get(key, 0.0) >= old, key
        assert value(final, "asyncio_executor_run_duration_seconds_count", **offloads) == WORKERS
        assert (
            value(final, "asyncio_loop_slow_callbacks_total", loop="MainThread")
            >= slow_before + WORKERS
        )


class TestMergeFiles:
    """The merge itself, without servers."""

    def test_dead_process_counters_kept_gauges_dropped(self, tmp_path: Path) -> None:
        """A dead process's counters stay (folded into the retired file), its gauges go."""
        from loopscope._multiprocess import RETIRED, merge_directory

        dead_pid = _dead_pid()
        families = {
            "asyncio_loop_task_steps": {
                "type": "counter", "help": "h",
                "samples": [["asyncio_loop_task_steps_total", {"loop": "MainThread"}, 5.0]],
            },
            "asyncio_tasks": {
                "type": "gauge", "help": "h",
                "samples": [["asyncio_tasks", {"loop": "MainThread"}, 3.0]],
            },
            "asyncio_loop_info": {
                "type": "gauge", "help": "h",
                "samples": [["asyncio_loop_info", {"loop": "MainThread"}, 1.0]],
            },
        }  # fmt: skip
        live = tmp_path / f"loopscope-{os.getpid()}-a.json"
        dead = tmp_path / f"loopscope-{dead_pid}-b.json"
        for path, pid in ((live, os.getpid()), (dead, dead_pid)):
            path.write_text(json.dumps({"pid": pid, "families": families}))
        for _ in range(2):  # the second merge reads the retired file instead
            merged = {f.name: f for f in merge_directory(str(tmp_path)).families()}
            steps = merged["asyncio_loop_task_steps"].samples
            assert [s.value for s in steps] == [10.0]
            assert [s.value for s in merged["asyncio_tasks"].samples] == [3.0]
            assert [s.value for s in merged["asyncio_loop_info"].samples] == [1.0]
        assert not dead.exists()
        assert (tmp_path / RETIRED).exists()


class TestMergedInstallation:
    """install(multiprocess_dir=...) in this process, next to another process's file."""

    def test_own_figures_and_others(
        self, run: Any, registry: CollectorRegistry, tmp_path: Path
    ) -> None:
        """The registry shows this process's figures plus the files' (a dead process's
        counters included), and this process's file exists."""
        dead = {
            "asyncio_loop_task_steps": {
                "type": "counter", "help": "h",
                "samples": [["asyncio_loop_task_steps_total", {"loop": "MainThread"}, 1000.0]],
            },
        }  # fmt: skip
        pid = _dead_pid()
        path = tmp_path / f"loopscope-{pid}-c.json"
        path.write_text(json.dumps({"pid": pid, "families": dead}))
        loopscope.install(registry=registry, multiprocess_dir=str(tmp_path))

        async def main() -> None:
            await asyncio.sleep(0)

        run(main)
        steps = registry.get_sample_value("asyncio_loop_task_steps_total", {"loop": "MainThread"})
        assert steps is not None and 1002 <= steps < 1010
        assert list(tmp_path.glob(f"loopscope-{os.getpid()}-*.json"))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(10)
    return process.pid


class TestForkedChild:
    """A loop alive at fork time counts the child's own steps in the child."""

    @pytest.mark.parametrize("shared", [True, False], ids=["multiprocess_dir", "no_dir"])
    def test_child_counts_its_steps(self, loop_kind: str, shared: bool, tmp_path: Path) -> None:
        """Parent runs 100 steps, forks; the child's 1,000 further steps on the same loop
        add 1,001 task steps (1,000 awaits and the task's last step) to what it exports."""
        make = (
            "import uvloop; loop = uvloop.new_event_loop()"
            if loop_kind == "uvloop"
            else "loop = asyncio.new_event_loop()"
        )
        option = f"multiprocess_dir={str(tmp_path)!r}" if shared else ""
        source = textwrap.dedent(
            f"""
            import asyncio, os, loopscope
            from prometheus_client import REGISTRY
            loopscope.install({option})
            {make}
            async def steps(n):
                for _ in range(n):
                    await asyncio.sleep(0)
            loop.run_until_complete(steps(100))
            pid = os.fork()
            if pid == 0:
                def count():
                    labels = {{"loop": "MainThread"}}
                    return REGISTRY.get_sample_value("asyncio_loop_task_steps_total", labels)
                before = count()
                loop.run_until_complete(steps(1000))
                print(count() - before, flush=True)
                os._exit(0)
            os.waitpid(pid, 0)
            """
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSCOPE_")}
        if "LOOPSCOPE_PURE_PYTHON" in os.environ:  # the hot path under test
            env["LOOPSCOPE_PURE_PYTHON"] = os.environ["LOOPSCOPE_PURE_PYTHON"]
        result = subprocess.run(
            [sys.executable, "-c", source], env=env, capture_output=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr.decode()
        assert float(result.stdout) == 1001.0, result.stderr.decode()


def test_a_process_file_in_a_retired_directory_is_dropped_quietly(tmp_path: Path) -> None:
    """A worker that outlives the command owning the shared directory (``loopscope run``
    removes it once the command ends) stops writing without reporting a fault; a write that
    fails while the directory is still there is reported."""
    from loopscope._multiprocess import ProcessFiles

    faults: list[str] = []
    directory = tmp_path / "shared"
    directory.mkdir()
    files = ProcessFiles(list, str(directory), lambda what, exc: faults.append(what))
    os.mkdir(files.path)  # the file's name taken by a directory: os.replace() fails
    files.write()
    assert faults == ["writing the multiprocess file"]
    assert not files.stopped.is_set()
    os.rmdir(files.path)
    for leftover in directory.iterdir():
        leftover.unlink()
    directory.rmdir()
    files.write()
    assert faults == ["writing the multiprocess file"]
    assert files.stopped.is_set()
