"""Restarts and several workers with one ``port`` setting, and prometheus_client's
multiprocess mode.

A restarted service binds its port again at once; a worker whose sibling or parent already
serves the port joins it instead of failing; a port held by anything else, or an address
that is not this machine's, is a clear error with nothing installed; an application that
reads ``PROMETHEUS_MULTIPROC_DIR`` with ``MultiProcessCollector`` sees loopscope's figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

import loopscope
from loopscope import _installation, _port_sharing

from .conftest import make_loop, sample
from .ports import free_port
from .test_workers import parse, value

ROOT = Path(__file__).resolve().parent.parent


#: A child that serves ``port`` until its standard input closes.
SERVE_PORT = (
    "import sys, loopscope; loopscope.install(port={port}); print('ready', flush=True); "
    "sys.stdin.read()"
)


def scrape(port: int) -> str:
    """One GET of /metrics on 127.0.0.1:``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment for a child Python, without LOOPSCOPE_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSCOPE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@contextlib.contextmanager
def child(source: str, *args: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A child Python running ``source`` with pipes on its standard streams; it must print
    ``ready``; it is killed (if still running) and its pipes closed on the way out."""
    process = subprocess.Popen(
        [sys.executable, "-c", source, *args], env=child_env(**env), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        if process.stdout.readline() != b"ready\n":
            process.kill()
            pytest.fail(process.communicate(timeout=10)[1].decode()[-3000:])
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def make_loop_source(loop_kind: str) -> str:
    """Python source that makes a loop of ``loop_kind`` as an application would."""
    if loop_kind == "uvloop":
        return "import uvloop; loop = uvloop.new_event_loop()"
    return "import asyncio; loop = asyncio.new_event_loop()"


class TestRestart:
    """A service stopped after a scrape starts again at once on the same port."""

    def test_reinstall_right_after_a_scrape(self, loop_kind: str) -> None:
        """install, run a loop, scrape, uninstall and install again, 20 times: no bind fails
        (the scraped connections are in TIME_WAIT each time)."""
        port = free_port()
        for attempt in range(20):
            loopscope.install(port=port, registry=CollectorRegistry())
            loop = make_loop(loop_kind)
            try:
                loop.run_until_complete(asyncio.sleep(0))
            finally:
                loop.close()
            text = scrape(port)
            assert value(parse(text), "asyncio_loop_task_steps_total", loop="MainThread") >= 1, (
                attempt
            )
            loopscope.uninstall()

    def test_process_restarted_at_once(self, loop_kind: str) -> None:
        """A process serving the port is scraped, stopped, and a new one started at once
        binds the same port, five times in a row."""
        port = free_port()
        source = textwrap.dedent(
            f"""
            import sys, loopscope
            loopscope.install(port={port})
            {make_loop_source(loop_kind)}
            import asyncio
            loop.run_until_complete(asyncio.sleep(0))
            print("ready", flush=True)
            sys.stdin.read()
            """
        )
        for _attempt in range(5):
            with child(source) as process:
                assert "asyncio_loop_task_steps_total" in scrape(port)
                _, err = process.communicate(b"", timeout=10)
                assert process.returncode == 0, err.decode()


class TestBindErrors:
    """What cannot be served is an error naming the option, with nothing installed."""

    def test_address_not_of_this_machine(self, registry: CollectorRegistry) -> None:
        """An address that is not an IP of this machine names the option addr."""
        with pytest.raises(loopscope.ConfigError, match=r"^option addr: .*'999\.1\.1\.1'"):
            loopscope.install(port=0, addr="999.1.1.1", registry=registry)
        assert _installation.current() is None
        assert list(registry.collect()) == []

    def test_port_held_by_another_program(
        self, busy_port: int, registry: CollectorRegistry
    ) -> None:
        """A port held by a program that is not a worker of this service is still an error
        naming the option port."""
        with pytest.raises(loopscope.ConfigError, match=r"^option port: .*in use by another"):
            loopscope.install(port=busy_port, registry=registry)
        assert _installation.current() is None
        assert list(registry.collect()) == []

    def test_port_served_by_a_child_is_not_joined(self, registry: CollectorRegistry) -> None:
        """A loopscope process that is this process's child, not its parent or sibling,
        holds the port: an error, not a join."""
        port = free_port()
        with child(SERVE_PORT.format(port=port)) as process:
            with pytest.raises(loopscope.ConfigError, match=rf"in use by process {process.pid}"):
                loopscope.install(port=port, registry=registry)
            assert _installation.current() is None


class TestJoin:
    """Workers of one service share the port's endpoint and their totals add up."""

    def test_forked_worker_joins_its_parent(self, loop_kind: str, tmp_path: Path) -> None:
        """A process serving the port forks a worker (gunicorn --preload): the worker runs
        its loop without serving, and the parent's /metrics counts the worker's tasks."""
        port = free_port()
        source = textwrap.dedent(
            f"""
            import asyncio, os, sys, time, loopscope
            loopscope.install(port={port})
            pid = os.fork()
            if pid == 0:
                {make_loop_source(loop_kind)}
                async def main():
                    await asyncio.gather(*(asyncio.sleep(0) for _ in range(50)))
                loop.run_until_complete(main())
                loop.close()
                sys.exit(0)  # at exit the worker writes its figures once more
            os.waitpid(pid, 0)
            print("ready", flush=True)
            sys.stdin.read()
            """
        )
        with child(source) as process:
            samples = parse(scrape(port))
            # The main task and the 50 that gather() wrapped the sleeps in.
            assert value(samples, "asyncio_tasks_created_total", loop="MainThread") == 51
            _, err = process.communicate(b"", timeout=10)
        assert process.returncode == 0, err.decode()
        assert b"Traceback" not in err, err.decode()

    def test_claims_of_dead_hosts_are_pruned(self, tmp_path: Path) -> None:
        """A claim and a group directory left by a host killed with SIGKILL are removed by
        the next host, so that a dead process is never joined."""
        port = free_port()
        with child(SERVE_PORT.format(port=port)) as process:
            base = Path(_port_sharing.base_directory())
            group = base / f"group-{process.pid}-127.0.0.1-{port}.d"
            group.mkdir()
            process.kill()
            process.wait(10)
        assert (base / f"127.0.0.1-{port}.json").exists()
        loopscope.install(port=free_port(), registry=CollectorRegistry())
        assert not group.exists()
        assert not (base / f"127.0.0.1-{port}.json").exists()


@pytest.fixture(name="prometheus_dir")
def fixture_prometheus_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """prometheus_client's multiprocess mode on, with a directory of the test's own."""
    directory = tmp_path / "prom"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    yield directory


def multiprocess_view(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What an application in multiprocess mode serves: a fresh registry with
    MultiProcessCollector, as prometheus_client's documentation builds it per scrape."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


class TestPrometheusMultiprocessMode:
    """With PROMETHEUS_MULTIPROC_DIR set, MultiProcessCollector serves loopscope's figures."""

    def test_same_figures_as_the_collector(
        self, prometheus_dir: Path, registry: CollectorRegistry, loop_kind: str
    ) -> None:
        """Every counter, histogram bucket and gauge of loopscope's own collector is served,
        with the same value, by MultiProcessCollector over the directory."""
        installation = loopscope.install(registry=registry, slow_threshold=0.01)
        loop = make_loop(loop_kind)
        try:

            async def main() -> None:
                await asyncio.gather(*(asyncio.sleep(0.001) for _ in range(20)))
                time.sleep(0.02)  # one slow step

            loop.run_until_complete(main())
            assert installation.prometheus_files is not None
            installation.prometheus_files.write()
            ours = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in registry.collect()
                for s in family.samples
                # process_context_switches_total moves between two reads.
                if s.name.startswith("asyncio_") and not s.name.endswith("_created")
            }
            theirs = multiprocess_view(prometheus_dir)
        finally:
            loop.close()
        assert sample(registry, "asyncio_loop_slow_callbacks_total", loop="MainThread") == 1
        assert ours, "the collector exported nothing"
        assert {k: v for k, v in theirs.items() if k in ours} == ours
        assert set(ours) - set(theirs) == set()

    def test_processes_add_up_and_dead_gauges_go(
        self, prometheus_dir: Path, loop_kind: str
    ) -> None:
        """Two processes' counters add up, a process killed with SIGKILL keeps its counters
        but its gauges (tasks alive) go at the other's next write, and uninstall removes
        the process's own gauges."""
        source = textwrap.dedent(
            f"""
            import asyncio, sys, loopscope
            tasks = int(sys.argv[1])
            loopscope.install()
            {make_loop_source(loop_kind)}
            async def main():
                await asyncio.gather(*(asyncio.sleep(0) for _ in range(tasks)))
                return loop.create_task(asyncio.sleep(3600))  # one task stays alive
            pending = loop.run_until_complete(main())
            loopscope.install().prometheus_files.write()
            print("ready", flush=True)
            sys.stdin.readline()
            loopscope.uninstall()
            print("uninstalled", flush=True)
            sys.stdin.readline()
            """
        )
        with contextlib.ExitStack() as stack:
            processes = [
                stack.enter_context(
                    child(source, str(count), PROMETHEUS_MULTIPROC_DIR=str(prometheus_dir))
                )
                for count in (10, 30)
            ]
            view = multiprocess_view(prometheus_dir)
            # Each process: its main task, the gathered ones and the one left pending.
            assert value(view, "asyncio_tasks_created_total", loop="MainThread") == 12 + 32
            assert value(view, "asyncio_tasks", loop="MainThread") == 2
            processes[0].kill()
            processes[0].wait(10)
            deadline = time.monotonic() + 10
            while value(multiprocess_view(prometheus_dir), "asyncio_tasks", loop="MainThread") != 1:
                assert time.monotonic() < deadline, "the dead process's gauge stayed"
                time.sleep(0.1)
            view = multiprocess_view(prometheus_dir)
            assert value(view, "asyncio_tasks_created_total", loop="MainThread") == 12 + 32
            survivor = processes[1]
            assert survivor.stdin is not None and survivor.stdout is not None
            survivor.stdin.write(b"\n")
            survivor.stdin.flush()
            assert survivor.stdout.readline() == b"uninstalled\n"
            assert not list(prometheus_dir.glob("gauge_*"))
            view = multiprocess_view(prometheus_dir)
            assert value(view, "asyncio_tasks", loop="MainThread") == 0
            assert value(view, "asyncio_tasks_created_total", loop="MainThread") == 12 + 32

    def test_bad_directory_is_an_error(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registry: CollectorRegistry
    ) -> None:
        """A PROMETHEUS_MULTIPROC_DIR that is not a directory names the variable, and nothing
        is installed."""
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
        with pytest.raises(loopscope.ConfigError, match="PROMETHEUS_MULTIPROC_DIR"):
            loopscope.install(registry=registry)
        assert _installation.current() is None
        assert list(registry.collect()) == []
