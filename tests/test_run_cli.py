"""``loopscope run -- COMMAND``: loopscope installed at start-up, with no code change."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loopscope import _run

ROOT = Path(__file__).resolve().parent.parent

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
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSCOPE_")}
    base.pop("PYTHONPATH", None)
    # Well under the 0.3 s blocking step, well over any other step on a busy machine.
    base["LOOPSCOPE_SLOW_THRESHOLD"] = "0.25"
    return subprocess.run(
        [sys.executable, "-m", "loopscope", "run", *args],
        cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


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
        from .test_workers import free_port

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
        assert not os.path.exists(directory)


class TestHarmless:
    """Nothing breaks where loopscope cannot or should not act."""

    def test_bad_option(self, app: Path) -> None:
        """A bad value is reported before the command starts."""
        done = loopscope_run("--slow-threshold", "-1", "--", sys.executable, str(app))
        assert done.returncode == 2
        assert "LOOPSCOPE_SLOW_THRESHOLD" in done.stderr
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

    def test_interpreter_without_loopscope(self, tmp_path: Path) -> None:
        """An interpreter that cannot import loopscope starts silently."""
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
