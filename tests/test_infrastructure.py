"""Loops of the server around the application (gunicorn's control socket, its dirty arbiter)
are not instrumented from their constructor; the application's loops are, and an explicit
``loopscope.instrument(loop)`` always is."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import loopscope
from loopscope._infrastructure import created_by_server_infrastructure, creator_module

from .ports import free_port

ROOT = Path(__file__).resolve().parent.parent

# What gunicorn.ctl.server does: asyncio.run() in a thread it starts (see _run_loop there).
SERVER_SOURCE = """
import threading

async def serve():
    pass

def run_loop(runner, factory, made):
    if factory is None:
        runner(serve())
    else:
        made.append(factory())

def start(runner=None, factory=None):
    made = []
    thread = threading.Thread(target=run_loop, args=(runner, factory, made))
    thread.start()
    thread.join()
    return made[0] if made else None

def ask(decide):
    return decide()
"""

# What a gunicorn worker does: the arbiter forks and calls the worker class, whose code
# (uvicorn's, aiohttp's) makes the loop.
WORKER_SOURCE = """
async def serve():
    pass

def run(runner=None, factory=None):
    return runner(serve()) if factory is None else factory()
"""
ARBITER_SOURCE = """
def spawn_worker(worker, **how):
    return worker.run(**how)
"""


def fake_module(name: str, source: str) -> ModuleType:
    """A module named ``name`` (its frames say so) that is not in ``sys.modules``."""
    module = ModuleType(name)
    exec(compile(source, f"<fake {name}>", "exec"), module.__dict__)
    return module


def runner_for(kind: str) -> Callable[[Any], Any]:
    """``asyncio.run`` or ``uvloop.run``."""
    if kind == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def factory_for(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """``asyncio.new_event_loop`` or ``uvloop.new_event_loop``."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def record_decisions(monkeypatch: pytest.MonkeyPatch, kind: str) -> list[bool]:
    """Wrap the loop constructor of ``kind`` as loopscope does, recording the decision."""
    if kind == "uvloop":
        import uvloop

        cls: type[Any] = uvloop.Loop
    else:
        cls = asyncio.BaseEventLoop
    original = cls.__init__
    decisions: list[bool] = []

    def __init__(loop: Any, *args: Any, **kwargs: Any) -> None:
        original(loop, *args, **kwargs)
        decisions.append(created_by_server_infrastructure(sys._getframe(1)))

    monkeypatch.setattr(cls, "__init__", __init__)
    return decisions


def require(module: str) -> ModuleType:
    """Import ``module``; missing fails the test under CI and skips it elsewhere."""
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed (pip install 'loopscope[test]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def control_server_module() -> ModuleType:
    """gunicorn.ctl.server; skips with a gunicorn older than 25.1 (it has no control socket)."""
    require("gunicorn")
    try:
        return importlib.import_module("gunicorn.ctl.server")
    except ImportError:
        pytest.skip("this gunicorn has no control socket (added in gunicorn 25.1)")


@contextlib.contextmanager
def control_server(path: Path) -> Iterator[Any]:
    """gunicorn's real control socket server, started as the arbiter starts it."""
    module = control_server_module()
    server = module.ControlSocketServer(SimpleNamespace(log=None, WORKERS={}), str(path))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ask_control_server(path: Path, deadline: float) -> dict[str, Any]:
    """``show workers`` over the control socket, retrying until it answers."""
    from gunicorn.ctl.protocol import ControlProtocol, make_request

    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                ControlProtocol.write_message(sock, make_request(1, "show", ["workers"]))
                response = ControlProtocol.read_message(sock)
            assert response.get("status") == "ok", response
            return dict(response["data"])
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class TestDecision:
    """created_by_server_infrastructure() on its own, with the constructors wrapped here."""

    def test_server_loop_refused(self, monkeypatch: pytest.MonkeyPatch, loop_kind: str) -> None:
        """A loop run from a thread by a gunicorn.ctl module is the server's."""
        decisions = record_decisions(monkeypatch, loop_kind)
        server = fake_module("gunicorn.ctl.server", SERVER_SOURCE)
        server.start(runner=runner_for(loop_kind))
        server.start(factory=factory_for(loop_kind)).close()
        assert decisions == [True, True]

    def test_application_loop_accepted(
        self, monkeypatch: pytest.MonkeyPatch, loop_kind: str
    ) -> None:
        """A loop made by application or worker code is the application's, even with the
        gunicorn arbiter further up the stack."""
        decisions = record_decisions(monkeypatch, loop_kind)

        async def main() -> None:
            pass

        runner_for(loop_kind)(main())
        factory_for(loop_kind)().close()
        arbiter = fake_module("gunicorn.arbiter", ARBITER_SOURCE)
        worker = fake_module("uvicorn_worker", WORKER_SOURCE)
        arbiter.spawn_worker(worker, runner=runner_for(loop_kind))
        arbiter.spawn_worker(worker, factory=factory_for(loop_kind)).close()
        assert decisions == [False, False, False, False]

    @pytest.mark.parametrize(
        ("module", "refused"),
        [
            ("gunicorn.ctl", True),
            ("gunicorn.ctl.server", True),
            ("gunicorn.dirty.arbiter", True),
            ("gunicorn.ctlx", False),
            ("gunicorn.arbiter", False),
            ("gunicorn.workers.gasgi", False),
            ("gunicorn.dirty.worker", False),
            ("app.gunicorn.ctl", False),
        ],
    )
    def test_module_names(self, module: str, refused: bool) -> None:
        """Only the listed modules and their submodules are server infrastructure."""
        assert fake_module(module, SERVER_SOURCE).ask(created_by_server_infrastructure) is refused

    def test_unnamed_module_accepted(self) -> None:
        """A creator frame without a module name is not infrastructure (instrumented)."""
        module = fake_module("gunicorn.ctl.server", SERVER_SOURCE)
        module.__dict__["__name__"] = None
        assert module.ask(lambda: creator_module(sys._getframe(1))) is None
        assert module.ask(created_by_server_infrastructure) is False

    def test_real_control_server_refused(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """The loop of gunicorn's own ControlSocketServer is the server's."""
        control_server_module()
        decisions = record_decisions(monkeypatch, "asyncio")
        with control_server(tmp_path / "ctl"):
            ask_control_server(tmp_path / "ctl", time.monotonic() + 5)
        assert decisions == [True]


class TestInstallation:
    """The constructor wrapper of a real installation follows the decision."""

    def test_control_server_loop_not_instrumented(
        self, installed: loopscope.Installation, registry: CollectorRegistry, tmp_path: Path
    ) -> None:
        """gunicorn's control socket loop, while it serves, has no probe and no series."""
        with control_server(tmp_path / "ctl"):
            ask_control_server(tmp_path / "ctl", time.monotonic() + 5)
            assert installed.live_probes() == []
            labels = {s.labels.get("loop") for f in registry.collect() for s in f.samples}
            assert labels <= {None}

    def test_explicit_instrument_wins(
        self, installed: loopscope.Installation, loop_kind: str
    ) -> None:
        """loopscope.instrument() instruments a loop the constructor left alone."""
        server = fake_module("gunicorn.ctl.server", SERVER_SOURCE)
        loop = server.start(factory=factory_for(loop_kind))
        try:
            assert installed.probe_for(loop) is None
            assert loopscope.instrument(loop) is loop
            assert installed.probe_for(loop) is not None
        finally:
            loop.close()

    def test_worker_loop_instrumented(
        self, installed: loopscope.Installation, loop_kind: str
    ) -> None:
        """A loop made by worker code under the gunicorn arbiter is instrumented."""
        arbiter = fake_module("gunicorn.arbiter", ARBITER_SOURCE)
        worker = fake_module("uvicorn_worker", WORKER_SOURCE)
        loop = arbiter.spawn_worker(worker, factory=factory_for(loop_kind))
        try:
            assert installed.probe_for(loop) is not None
        finally:
            loop.close()


def loop_labels(text: str) -> set[str]:
    """Every ``loop`` label value in exposition text."""
    return {
        s.labels["loop"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "loop" in s.labels
    }


class TestGunicornEndToEnd:
    """gunicorn with uvicorn workers under ``loopscope run``, its master serving /metrics."""

    def test_master_control_loop_not_exported(self, tmp_path: Path) -> None:
        """While the master's control socket answers, /metrics has the workers' MainThread
        series and no series of the control thread's loop."""
        control_server_module()
        require("uvicorn_worker")
        metrics_port, http_port = free_port(), free_port()
        ctl = tmp_path / "ctl"
        (tmp_path / "mp").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSCOPE_")}
        env.update(
            LOOPSCOPE_MULTIPROCESS_DIR=str(tmp_path / "mp"),
            LOOPSCOPE_EVENTS="off",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        command = [
            sys.executable, "-m", "loopscope", "run", "--port", str(metrics_port), "--",
            sys.executable, "-m", "gunicorn", "-w", "2", "-k", "uvicorn_worker.UvicornWorker",
            "-b", f"127.0.0.1:{http_port}", "--control-socket", str(ctl),
            "--graceful-timeout", "1", "tests.asgi_blocking_app:app",
        ]  # fmt: skip
        log = tmp_path / "server.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            workers = ask_control_server(ctl, deadline)  # served by the master's loop
            assert workers["count"] == 2
            while True:
                try:
                    url = f"http://127.0.0.1:{metrics_port}/metrics"
                    with urllib.request.urlopen(url, timeout=5) as response:
                        labels = loop_labels(response.read().decode())
                except OSError:
                    labels = set()
                if "MainThread" in labels or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            server_log = log.read_text(errors="replace")[-3000:]
            assert "MainThread" in labels, server_log
            assert not [label for label in labels if "_run_loop" in label], server_log
            assert labels == {"MainThread"}, server_log
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
