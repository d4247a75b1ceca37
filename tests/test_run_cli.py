"""``loopscope run -- COMMAND``: loopscope installed at start-up, with no code change."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from loopscope import _installation, _multiprocess, _run
from loopscope._options import Options

ROOT = Path(__file__).resolve().parent.parent
#: The hot path under test (read before the autouse fixture clears LOOPSCOPE_* variables),
#: handed to the commands the tests start.
HOT_PATH = {k: v for k, v in os.environ.items() if k == "LOOPSCOPE_PURE_PYTHON"}

# Runs one blocking step on each loop kind named in argv[1] (default: both), then reports
# what loopscope measured in this process.
APP = """
import asyncio, json, os, sys, time
from loopscope import _installation

async def main():
    time.sleep(0.3)

for kind in (sys.argv[1] if len(sys.argv) > 1 else "asyncio,uvloop").split(","):
    if kind == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
inst = _installation.current()
registry = inst.options.registry
kinds = sorted(
    s.labels["implementation"] for f in registry.collect() for s in f.samples
    if s.name == "asyncio_loop_info" and s.labels["loop"] == "MainThread"
)
print(json.dumps({
    "slow": registry.get_sample_value(
        "asyncio_loop_slow_callbacks_total", {"loop": "MainThread"}),
    "kinds": kinds,
    "threshold": inst.options.slow_threshold,
    "port": inst.port,
    "directory": inst.options.multiprocess_dir,
}))
"""
BOTH = ["asyncio", "uvloop"]


def loopscope_run(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m loopscope run ARGS`` and wait for it (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "loopscope", "run", *args],
        cwd=cwd, env=launcher_env(env), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def launcher_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launcher a test starts: no LOOPSCOPE_* variable of the test
    run's own but the hot path's, then ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSCOPE_")}
    base.pop("PYTHONPATH", None)
    # Well under the 0.3 s blocking step, well over any other step on a busy machine.
    base["LOOPSCOPE_SLOW_THRESHOLD"] = "0.25"
    return {**base, **HOT_PATH, **(extra or {})}


def wait_until_gone(path: Path | str, seconds: float = 30.0) -> bool:
    """Whether ``path`` has disappeared within ``seconds`` (the remover works right after
    the command ends, asynchronously)."""
    deadline = time.monotonic() + seconds
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def run_directories(tmp: Path) -> list[Path]:
    """The temporary directories ``loopscope run`` made in ``tmp``."""
    return sorted(tmp.glob("loopscope-*"))


def no_run_directories_left(tmp: Path, seconds: float = 30.0) -> bool:
    """Whether the temporary directories ``loopscope run`` made in ``tmp`` are all gone
    within ``seconds``."""
    deadline = time.monotonic() + seconds
    while run_directories(tmp):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def last_json(text: str) -> dict[str, object]:
    import json

    result = json.loads(text.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


@pytest.fixture(name="app")
def fixture_app(tmp_path: Path) -> Path:
    path = tmp_path / "app.py"
    path.write_text(APP)
    return path


class TestRun:
    """The command runs with loopscope installed before its own code."""

    def test_python_script(self, app: Path, loop_kind: str) -> None:
        """A blocking step of a plain script is counted, with no loopscope call in it; an
        option wins over the variable."""
        done = loopscope_run("--slow-threshold", "0.2", "--", sys.executable, str(app), loop_kind)
        assert done.returncode == 0, done.stderr
        report = last_json(done.stdout)
        assert report["kinds"] == [loop_kind]
        assert report["slow"] == 1
        assert report["threshold"] == 0.2

    def test_console_script_style(self, tmp_path: Path) -> None:
        """An executable script whose #! line names Python (as uvicorn's and gunicorn's
        console scripts do) is recognised and instrumented (both loops, one process)."""
        script = tmp_path / "serve"
        script.write_text(f"#!{sys.executable}\n{APP}")
        script.chmod(0o755)
        done = loopscope_run("--", str(script))
        assert done.returncode == 0, done.stderr
        assert "not a Python program" not in done.stderr
        report = last_json(done.stdout)
        assert report["kinds"] == BOTH
        assert report["slow"] == 2

    def test_python_module_configured_by_environment(self, tmp_path: Path) -> None:
        """``python -m package`` too, configured by LOOPSCOPE_* variables (both loops)."""
        package = tmp_path / "mypkg"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "__main__.py").write_text(APP)
        done = loopscope_run(
            "--", sys.executable, "-m", "mypkg", cwd=tmp_path,
            env={"LOOPSCOPE_SLOW_THRESHOLD": "0.22"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        report = last_json(done.stdout)
        assert report["kinds"] == BOTH
        assert report["slow"] == 2
        assert report["threshold"] == 0.22

    def test_port_and_temporary_directory(self, tmp_path: Path) -> None:
        """The first process serves the port; a child Python (running both loops) skips it
        quietly and its figures are in what the first one serves; the temporary
        directory of the run is removed at exit."""
        from .ports import free_port

        port = free_port()
        script = tmp_path / "parent.py"
        script.write_text(
            textwrap.dedent(f"""
            import json, subprocess, sys, urllib.request
            from loopscope import _installation
            child = subprocess.run(
                [sys.executable, {str(tmp_path / "app.py")!r}],
                capture_output=True, text=True, timeout=30)
            body = urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=10).read()
            inst = _installation.current()
            print(child.stderr, file=sys.stderr)
            print(child.stdout.strip().splitlines()[-1])
            line = b'asyncio_loop_slow_callbacks_total{{loop="MainThread"}} '
            slow = [float(x.split()[-1]) for x in body.splitlines() if x.startswith(line)]
            print(json.dumps({{"port": inst.port, "slow_in_body": slow}}))
        """)
        )
        (tmp_path / "app.py").write_text(APP)
        done = loopscope_run("--port", str(port), "--", sys.executable, str(script))
        assert done.returncode == 0, done.stderr
        assert "not instrumented" not in done.stderr
        child, parent = (last_json(line) for line in done.stdout.strip().splitlines()[-2:])
        assert parent["port"] == port
        assert child["port"] is None
        assert child["kinds"] == BOTH
        assert child["slow"] == 2
        # The child's figures are merged into what the parent serves.
        assert parent["slow_in_body"] == [2.0]
        directory = child["directory"]
        assert isinstance(directory, str)
        assert wait_until_gone(directory)


class TestHarmless:
    """Nothing breaks where loopscope cannot or should not act."""

    def test_bad_option(self, app: Path) -> None:
        """A bad value is reported before the command starts, naming the flag typed."""
        done = loopscope_run("--slow-threshold", "-1", "--", sys.executable, str(app))
        assert done.returncode == 2
        assert done.stderr.startswith("loopscope run: --slow-threshold must be")
        assert done.stdout == ""

    def test_command_not_found(self) -> None:
        """A missing command is a clear error."""
        done = loopscope_run("--", "no-such-command-for-loopscope")
        assert done.returncode == 127
        assert "command not found: no-such-command-for-loopscope" in done.stderr

    def test_no_command(self) -> None:
        """``loopscope run`` alone explains its usage."""
        done = loopscope_run()
        assert done.returncode == 2
        assert "usage" in done.stderr

    def test_not_python(self, tmp_path: Path) -> None:
        """A program that is not Python runs unchanged, with a clear message."""
        script = tmp_path / "hello.sh"
        script.write_text("#!/bin/sh\necho hello from sh\n")
        script.chmod(0o755)
        done = loopscope_run("--", str(script))
        assert done.returncode == 0
        assert done.stdout == "hello from sh\n"
        assert "is not a Python program" in done.stderr

    def test_child_with_bad_variable(self, tmp_path: Path) -> None:
        """A Python child that cannot be instrumented says so in one line and runs."""
        script = tmp_path / "parent.py"
        script.write_text(
            textwrap.dedent("""
            import os, subprocess, sys
            env = dict(os.environ, LOOPSCOPE_SLOW_THRESHOLD="soon")
            subprocess.run([sys.executable, "-c", "print(42)"], env=env, timeout=30)
        """)
        )
        done = loopscope_run("--", sys.executable, str(script))
        assert done.returncode == 0, done.stderr
        assert done.stdout == "42\n"
        assert done.stderr.count("loopscope: this process is not instrumented") == 1

    def test_command_whose_python_cannot_import_loopscope(self, tmp_path: Path) -> None:
        """The command itself, when its Python cannot import loopscope, says so in one
        line naming that Python and why, and runs uninstrumented; the Python processes it
        starts that cannot import loopscope either start silently."""
        broken = tmp_path / "shadow" / "loopscope"
        broken.mkdir(parents=True)
        (broken / "__init__.py").write_text("raise ImportError('not here')\n")
        shadow = str(broken.parent)
        # The launcher finds its own loopscope; the command's Python finds the shadow first.
        launcher = (
            "import sys; sys.path.remove(SHADOW); from loopscope._run import main; "
            "sys.exit(main(sys.argv[1:]))"
        ).replace("SHADOW", repr(shadow))
        child = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'print(2)'])"
        done = subprocess.run(
            [sys.executable, "-c", launcher, "run", "--", sys.executable, "-c",
             f"print(1); {child}"],
            cwd=tmp_path, env=launcher_env({"PYTHONPATH": shadow}), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout == "1\n2\n"
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"loopscope run: this Python ({sys.executable}) cannot ")
        assert "ImportError: not here" in lines[0]

    def test_interpreter_without_loopscope(self, tmp_path: Path) -> None:
        """Another interpreter than the command's that cannot import loopscope starts
        silently."""
        broken = tmp_path / "shadow" / "loopscope"
        broken.mkdir(parents=True)
        (broken / "__init__.py").write_text("raise ImportError('not here')\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSCOPE_")}
        env.update(PYTHONPATH=os.pathsep.join([_run.SITE_DIR, str(broken.parent)]),
                   LOOPSCOPE_RUN="1")  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", "print('ran')"], env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 0
        assert done.stdout == "ran\n"
        assert done.stderr == ""

    def test_chains_existing_sitecustomize(self, app: Path, tmp_path: Path) -> None:
        """A sitecustomize loopscope's own shadows still runs."""
        other = tmp_path / "other"
        other.mkdir()
        (other / "sitecustomize.py").write_text("print('their sitecustomize')\n")
        done = loopscope_run(
            "--", sys.executable, str(app), "asyncio", env={"PYTHONPATH": str(other)}
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("their sitecustomize\n")
        assert last_json(done.stdout)["slow"] >= 1

    def test_console_script(self, app: Path) -> None:
        """The installed ``loopscope`` command is the same entry point."""
        script = Path(sys.executable).parent / "loopscope"
        if not script.exists():
            pytest.skip("loopscope's console script is not installed next to this Python")
        done = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert "run" in done.stderr


# --- the launcher's checks, in this process (up to the exec, which must not happen) -------

Launch = Callable[..., tuple[int, str]]

#: An invalid value for every flag of ``loopscope run``.
BAD_VALUES = {
    "--slow-threshold": "-1",
    "--lag-interval": "0",
    "--port": "abc",
    "--addr": "a b",
    "--loop-name": "x" * 129,
    "--events": "maybe",
    "--loop-blocked-after": "0",
    "--log-stack": "some",
    "--import-events": "twice",
    "--events-endpoint": "maybe",
    "--stderr-reports": "sometimes",
    "--max-loop-labels": "0",
    "--max-locations": "many",
    "--max-executor-labels": "10001",
    "--multiprocess-dir": "/nonexistent-loopscope/dir",
    "--tls-certfile": "/nonexistent-loopscope/cert.pem",
    "--tls-keyfile": "/nonexistent-loopscope/key.pem",
    "--tls-client-cafile": "/nonexistent-loopscope/ca.pem",
    "--otel": "maybe",
    "--basic-auth-username": "a:b",
    "--basic-auth-password-file": "/nonexistent-loopscope/password",
}


def run_flags() -> set[str]:
    """The flags ``loopscope run`` accepts (but --help)."""
    parser = _run._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = commands.choices["run"]
    return {flag for action in run._actions for flag in action.option_strings} - {
        "-h",
        "--help",
    }


@pytest.fixture(name="launch")
def fixture_launch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Launch:
    """``loopscope run ARGS -- python -c pass`` run in this process: its exit status and
    stderr.  Used for launches that must stop before the command starts."""

    def no_exec(path: str, *args: Any) -> None:
        raise AssertionError(f"the launcher went on to start {path}")

    monkeypatch.setattr(os, "execve", no_exec)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def launch(*args: str) -> tuple[int, str]:
        status = _run.main(["run", *args, "--", sys.executable, "-c", "pass"])
        return status, capsys.readouterr().err

    return launch


class TestFlags:
    """The flags are the options, derived from the one table of options."""

    def test_every_option_has_a_flag(self) -> None:
        """Every option with a LOOPSCOPE_* variable has its flag (the password's reads a
        file), and there is no other flag."""
        expected = set()
        for f in fields(Options):
            if f.name in ("registry", "instruments"):
                continue  # a Python object: no variable, no flag
            flag = "--" + f.name.replace("_", "-")
            expected.add(flag + "-file" if f.name == "basic_auth_password" else flag)
        assert run_flags() == expected
        assert set(BAD_VALUES) == expected  # each flag has a case below

    @pytest.mark.parametrize("flag", sorted(BAD_VALUES))
    def test_error_names_the_flag(self, launch: Launch, flag: str) -> None:
        """A bad flag value exits with status 2 and a message naming the flag typed, not
        the variable it is passed on as."""
        status, err = launch(flag, BAD_VALUES[flag])
        assert status == 2
        assert err.startswith(f"loopscope run: {flag}"), err
        assert "LOOPSCOPE_" not in err

    def test_error_names_the_variable(
        self, launch: Launch, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bad value from the environment names the variable."""
        monkeypatch.setenv("LOOPSCOPE_PORT", "abc")
        status, err = launch()
        assert status == 2
        assert err.startswith("loopscope run: environment variable LOOPSCOPE_PORT must be")

    @pytest.mark.parametrize("flag", ["--addr", "--port", "--loop-name", "--multiprocess-dir"])
    @pytest.mark.parametrize("value", ["", "  "])
    def test_empty_value_refused(self, launch: Launch, flag: str, value: str) -> None:
        """An empty flag value is an error naming the flag (a flag is typed on purpose)."""
        status, err = launch(flag, value)
        assert status == 2
        assert err.startswith(f"loopscope run: {flag}: empty value")

    def test_flags_set_variables(self, tmp_path: Path) -> None:
        """Each flag sets its variable for the command; the password comes from its file
        (less its final line break)."""
        secret = tmp_path / "password"
        secret.write_text("correct horse\n")
        given = {
            "--slow-threshold": "0.2",
            "--lag-interval": "0.05",
            "--port": "0",
            "--addr": "127.0.0.1",
            "--loop-name": "main loop",
            "--events": "off",
            "--max-loop-labels": "7",
            "--max-locations": "8",
            "--max-executor-labels": "9",
            "--multiprocess-dir": str(tmp_path),
            "--basic-auth-username": "scraper",
            "--basic-auth-password-file": str(secret),
        }
        argv = [part for flag, value in given.items() for part in (flag, value)]
        args = _run._parser().parse_args(["run", *argv, "--", "true"])
        env = _run.build_environment(_run.flag_values(args), {"PYTHONPATH": "/elsewhere"})
        assert {k: v for k, v in env.items() if k.startswith("LOOPSCOPE_")} == {
            "LOOPSCOPE_SLOW_THRESHOLD": "0.2",
            "LOOPSCOPE_LAG_INTERVAL": "0.05",
            "LOOPSCOPE_PORT": "0",
            "LOOPSCOPE_ADDR": "127.0.0.1",
            "LOOPSCOPE_LOOP_NAME": "main loop",
            "LOOPSCOPE_EVENTS": "off",
            "LOOPSCOPE_MAX_LOOP_LABELS": "7",
            "LOOPSCOPE_MAX_LOCATIONS": "8",
            "LOOPSCOPE_MAX_EXECUTOR_LABELS": "9",
            "LOOPSCOPE_MULTIPROCESS_DIR": str(tmp_path),
            "LOOPSCOPE_BASIC_AUTH_USERNAME": "scraper",
            "LOOPSCOPE_BASIC_AUTH_PASSWORD": "correct horse",
            "LOOPSCOPE_RUN": "1",
            "LOOPSCOPE_RUN_OWNER": str(os.getpid()),
        }
        assert env["PYTHONPATH"] == os.pathsep.join([_run.SITE_DIR, "/elsewhere"])

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            ("", "holds no value"),
            (" \n", "holds no value"),
            ("hunter2\x07\n", "must be 1 to 1024 printable characters (value not shown)"),
        ],
    )
    def test_password_file_refused(
        self, launch: Launch, tmp_path: Path, content: str, message: str
    ) -> None:
        """A password file without a usable password is an error naming the flag, and the
        password is not shown."""
        secret = tmp_path / "password"
        secret.write_text(content)
        status, err = launch(
            "--basic-auth-username", "scraper", "--basic-auth-password-file", str(secret)
        )
        assert status == 2
        assert err.startswith("loopscope run: --basic-auth-password-file")
        assert message in err
        assert "hunter2" not in err


class TestEndpointChecks:
    """The address and the port are checked before the command starts; the command itself
    says when it cannot serve the port."""

    @pytest.mark.parametrize("addr", ["999.1.1.1", "192.0.2.1"])
    @pytest.mark.parametrize("given_as", ["flag", "variable"])
    def test_bad_addr(
        self, launch: Launch, monkeypatch: pytest.MonkeyPatch, addr: str, given_as: str
    ) -> None:
        """An address that is not one of this machine (not an address, or not local) exits
        with status 2, naming --addr or LOOPSCOPE_ADDR."""
        if given_as == "flag":
            status, err = launch("--addr", addr, "--port", "0")
            named = "--addr"
        else:
            monkeypatch.setenv("LOOPSCOPE_ADDR", addr)
            status, err = launch("--port", "0")
            named = "environment variable LOOPSCOPE_ADDR"
        assert status == 2
        assert err.startswith(f"loopscope run: {named}: {addr!r} is not"), err

    @pytest.mark.parametrize("given_as", ["flag", "variable"])
    def test_port_in_use(
        self, launch: Launch, monkeypatch: pytest.MonkeyPatch, busy_port: int, given_as: str
    ) -> None:
        """A port in use exits with status 2 before the command starts, naming --port or
        LOOPSCOPE_PORT."""
        if given_as == "flag":
            status, err = launch("--port", str(busy_port))
            named = "--port"
        else:
            monkeypatch.setenv("LOOPSCOPE_PORT", str(busy_port))
            status, err = launch()
            named = "environment variable LOOPSCOPE_PORT"
        assert status == 2
        assert err.startswith(f"loopscope run: {named}: cannot serve /metrics on 127.0.0.1:")
        assert "in use" in err

    @pytest.mark.parametrize("process", ["command", "other"])
    def test_port_taken_after_the_start(
        self,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        busy_port: int,
        process: str,
    ) -> None:
        """When the port is taken after the launcher's check, the command (the launcher's
        process id) says in one line that it is not instrumented; any other process of the
        command is instrumented without the port, quietly."""
        owner = os.getpid() if process == "command" else os.getppid()
        monkeypatch.setenv("LOOPSCOPE_RUN", "1")
        monkeypatch.setenv("LOOPSCOPE_RUN_OWNER", str(owner))
        monkeypatch.setenv("LOOPSCOPE_PORT", str(busy_port))
        _run.bootstrap()
        err = capsys.readouterr().err
        installation = _installation.current()
        if process == "command":
            assert installation is None
            assert err.startswith("loopscope: this process is not instrumented: option port")
            assert err.count("\n") == 1
        else:
            assert installation is not None and installation.port is None
            assert err == ""


# --- the temporary directory ---------------------------------------------------------------


class TestTemporaryDirectory:
    """The directory made for a run goes once the command has ended, quietly, however it
    ended, and the command runs as it would without loopscope."""

    def test_normal_exit_is_quiet(self, tmp_path: Path) -> None:
        """A command that exits normally prints nothing more, and its directory goes."""
        done = subprocess.run(
            [sys.executable, "-m", "loopscope", "run", "--", sys.executable, "-c", "print('x')"],
            cwd=ROOT, env=launcher_env({"TMPDIR": str(tmp_path)}), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert (done.returncode, done.stdout, done.stderr) == (0, "x\n", "")
        assert no_run_directories_left(tmp_path)

    def test_removed_after_sigterm(self, tmp_path: Path) -> None:
        """A command stopped by SIGTERM still dies of SIGTERM, and its directory goes; the
        command has SIGTERM's default disposition and no child of loopscope's."""
        script = textwrap.dedent("""
            import os, signal, time
            try:
                os.waitpid(-1, os.WNOHANG)
                children = "some"
            except ChildProcessError:
                children = "none"
            default = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            print("ready", default, children, flush=True)
            time.sleep(60)
        """)
        with subprocess.Popen(
            [sys.executable, "-m", "loopscope", "run", "--", sys.executable, "-c", script],
            cwd=ROOT, env=launcher_env({"TMPDIR": str(tmp_path)}), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        ) as process:  # fmt: skip
            try:
                assert process.stdout is not None
                assert process.stdout.readline() == "ready True none\n"
                assert len(run_directories(tmp_path)) == 1
                process.send_signal(signal.SIGTERM)
                _out, err = process.communicate(timeout=30)
            finally:
                if process.poll() is None:
                    process.kill()
        assert process.returncode == -signal.SIGTERM
        assert err == ""
        assert no_run_directories_left(tmp_path)

    def test_command_removes_after_its_last_write(
        self,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Where no remover could start, the command removes the directory at exit after
        the last write of its figures there, which reports no error."""
        directory = tmp_path / "loopscope-run"
        directory.mkdir()
        hooks: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        monkeypatch.setattr(atexit, "register", lambda f, *a: hooks.append((f, a)) or f)
        monkeypatch.setattr(_multiprocess, "WRITE_INTERVAL", 3600.0)  # no timed write
        monkeypatch.setenv("LOOPSCOPE_RUN", "1")
        monkeypatch.setenv("LOOPSCOPE_RUN_OWNER", str(os.getpid()))
        monkeypatch.setenv("LOOPSCOPE_RUN_TMPDIR", str(directory))
        monkeypatch.setenv("LOOPSCOPE_MULTIPROCESS_DIR", str(directory))
        _run._install()
        assert _installation.current() is not None
        with caplog.at_level(logging.ERROR, logger="loopscope"):
            for hook, args in reversed(hooks):  # as the interpreter runs them at exit
                hook(*args)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert not directory.exists()
