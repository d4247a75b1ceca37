"""The runnable examples in examples/, each run for real on loopback.

(``examples/gunicorn.conf.py`` and ``examples/zero_code_asgi.py`` run in test_workers.py,
``examples/sentry_instrument.py`` in test_sentry_example.py.)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .ports import free_port
from .test_export import METRIC_NAMES
from .test_workers import Samples, parse, stop_process, value

ROOT = Path(__file__).resolve().parent.parent
MAIN = {"loop": "MainThread"}
DEFAULT = {"loop": "MainThread", "executor": "default"}


def example_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSCOPE_")}
    env.update(PYTHONPATH=str(ROOT), LOOPSCOPE_EVENTS="off")
    return env


# The asyncio_ families every instrumented loop exports (counters without "_total").
LOOP_FAMILIES = {name for name in METRIC_NAMES if name.startswith("asyncio_")}


def line_of(path: str, text: str) -> int:
    """The number of the one line of ``path`` (relative to the checkout) holding ``text``."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    found = [n for n, line in enumerate(lines, 1) if text in line]
    assert len(found) == 1, (path, text, found)
    return found[0]


def web_command(name: str, port: int, loop_kind: str) -> list[str]:
    """The command line that serves the web example ``name`` on ``port`` and ``loop_kind``."""
    if name == "aiohttp":
        return [
            sys.executable, "-m", "examples.aiohttp_app", "--port", str(port),
            "--loop", loop_kind,
        ]  # fmt: skip
    pytest.importorskip("fastapi" if name == "fastapi" else "django")
    target = "examples.fastapi_app:app" if name == "fastapi" else "examples.django_app:application"
    return [
        sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
        "--loop", loop_kind, "--log-level", "warning",
    ]  # fmt: skip


@contextlib.contextmanager
def serving(
    command: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    errors: Path | None = None,
) -> Iterator[None]:
    """``command`` running in its own session until the block ends, its output in ``log``
    (its standard error too, unless ``errors`` names another file for it)."""
    with open(log, "wb") as out, open(errors or os.devnull, "wb") as err:
        process = subprocess.Popen(
            command, cwd=ROOT, env=example_env() if env is None else env, stdout=out,
            stderr=subprocess.STDOUT if errors is None else err, start_new_session=True,
        )  # fmt: skip
    try:
        yield
    finally:
        stop_process(process)


def get(url: str, deadline: float) -> tuple[int, str, bytes]:
    """GET ``url`` without following redirects, retrying connection errors until
    ``deadline``: the status, the Content-Type and the body."""
    parts = urllib.parse.urlsplit(url)
    while True:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        try:
            connection.request("GET", parts.path)
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        finally:
            connection.close()


def scrape(url: str, deadline: float) -> tuple[set[str], Samples]:
    """The family names and samples that ``GET url`` answers, which must be a 200 with the
    exposition itself (no redirect)."""
    status, content_type, body = get(url, deadline)
    assert status == 200, (status, body[:200])
    assert content_type.startswith("text/plain"), content_type
    text = body.decode()
    return {family.name for family in text_string_to_metric_families(text)}, parse(text)


@pytest.fixture(name="server")
def fixture_server(request: pytest.FixtureRequest, loop_kind: str, tmp_path: Path) -> Iterator[int]:
    """The example named by the test's parameter, serving on a free loopback port."""
    port = free_port()
    with serving(web_command(request.param, port, loop_kind), tmp_path / "server.log"):
        yield port


def check_block_offload_and_metrics(base: str, loop_kind: str) -> None:
    """Scrape, block the loop once, offload once, scrape again; check what changed."""
    deadline = time.monotonic() + 30
    _, before = scrape(f"{base}/metrics", deadline)
    get(f"{base}/block", deadline)
    get(f"{base}/offload", deadline)
    names, after = scrape(f"{base}/metrics", deadline)
    assert names >= LOOP_FAMILIES, LOOP_FAMILIES - names
    slow = "asyncio_loop_slow_callbacks_total"
    assert value(after, slow, **MAIN) >= value(before, slow, **MAIN) + 1
    runs = "asyncio_executor_run_duration_seconds"
    assert value(after, f"{runs}_count", **DEFAULT) == value(before, f"{runs}_count", **DEFAULT) + 1
    assert value(after, f"{runs}_sum", **DEFAULT) >= value(before, f"{runs}_sum", **DEFAULT) + 0.3
    kinds = {
        dict(labels)["implementation"]
        for (name, labels) in after
        if name == "asyncio_loop_info" and dict(labels)["loop"] == "MainThread"
    }
    assert kinds == {loop_kind}


@pytest.mark.parametrize("server", ["fastapi", "aiohttp", "django"], indirect=True)
class TestWebExamples:
    """The FastAPI (lifespan), aiohttp (on_startup) and Django (module import) examples,
    the last two under uvicorn."""

    def test_block_offload_and_metrics(self, server: int, loop_kind: str) -> None:
        """GET /metrics answers 200 with the asyncio_ families, with no redirect; a blocking
        request adds a slow step and an offloaded one an executor call, on the loop the
        server runs."""
        check_block_offload_and_metrics(f"http://127.0.0.1:{server}", loop_kind)


class TestDjangoUnderDaphne:
    """examples/django_app.py under daphne, started by ``loopscope run``.  daphne runs
    Twisted's asyncio reactor, on asyncio's loop only: it has no option for uvloop."""

    def test_block_offload_and_metrics(self, tmp_path: Path) -> None:
        """The loop daphne creates before it imports the app is measured: /metrics shows
        the blocking request as a slow step and the offloaded one as an executor call."""
        pytest.importorskip("django")
        pytest.importorskip("daphne")
        port = free_port()
        command = [
            sys.executable, "-m", "loopscope", "run", "--",
            sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
            "examples.django_app:application",
        ]  # fmt: skip
        with serving(command, tmp_path / "daphne.log"):
            check_block_offload_and_metrics(f"http://127.0.0.1:{port}", "asyncio")


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


class TestLoggingJSONExample:
    """examples/logging_json.py: standard logging with a JSON formatter, on both loops."""

    def test_event_is_a_json_line_with_its_fields(self, loop_kind: str) -> None:
        """It runs to the end; every line it prints is a JSON object, and the blocking
        request is one slow_callback line with the event's fields as keys."""
        done = subprocess.run(
            [sys.executable, "-m", "examples.logging_json", "--loop", loop_kind],
            cwd=ROOT, env=example_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        events = [line for line in lines if line.get("event") == "slow_callback"]
        assert len(events) == 1, lines
        event = events[0]
        where = f"examples/logging_json.py:{line_of('examples/logging_json.py', 'time.sleep(')}"
        assert event["location"] == f"{where} in handle"
        assert event["level"] == "WARNING"
        assert event["logger"] == "loopscope"
        assert event["message"].startswith("loop MainThread blocked ")
        assert event["message"].endswith(f" in task request-3 (handle) at {where} in handle")
        assert event["duration"] >= 0.3 > event["threshold"] == 0.1
        assert (event["loop"], event["kind"], event["task"], event["coro"]) == (
            "MainThread", "task", "request-3", "handle",
        )  # fmt: skip
        assert event["callback"] is None
        assert event["importing"] is False
        assert isinstance(event["blocking_stack"], list)
        assert event["blocking_stack"][-1] == f"{ROOT / where} in handle"
        done_lines = [line["message"] for line in lines if line["logger"] == "app"]
        assert sorted(done_lines) == [f"request {n} done" for n in range(5)]


def lines_when(path: Path, pattern: re.Pattern[str], deadline: float) -> list[str]:
    """The lines of ``path`` once one of them matches ``pattern`` (waits until
    ``deadline`` for that line to be written)."""
    while True:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        if any(pattern.search(line) for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


class TestUvicornLogConfig:
    """examples/uvicorn_log_config.json: loopscope's events in uvicorn's log format.  The
    app is examples/fastapi_app.py, which installs loopscope with its default ``events``
    (standard logging, as uvicorn does not configure structlog)."""

    @pytest.mark.parametrize("log_config", [True, False], ids=["example-config", "default"])
    def test_blocking_request_logged_on_stderr(
        self, loop_kind: str, log_config: bool, tmp_path: Path
    ) -> None:
        """With the example's config, the event is a line of uvicorn's own format on
        stderr (``WARNING:  loop MainThread blocked ...``); with uvicorn's default config,
        which leaves the ``loopscope`` logger without a handler, Python's last-resort
        handler still writes its message line to stderr.  Either way the application's
        blocking line ends the message and heads the stack below it."""
        pytest.importorskip("fastapi")
        port = free_port()
        command = [
            sys.executable, "-m", "uvicorn", "examples.fastapi_app:app",
            "--host", "127.0.0.1", "--port", str(port), "--loop", loop_kind,
        ]  # fmt: skip
        if log_config:
            command += ["--log-config", "examples/uvicorn_log_config.json"]
        env = example_env()
        del env["LOOPSCOPE_EVENTS"]
        line = line_of("examples/fastapi_app.py", "time.sleep(BLOCK")
        prefix = "WARNING:  " if log_config else ""
        event = re.compile(
            rf"^{prefix}loop MainThread blocked .+ in task .+ "
            rf"at examples/fastapi_app\.py:{line} in block$"
        )
        errors = tmp_path / "stderr.log"
        with serving(command, tmp_path / "stdout.log", env=env, errors=errors):
            deadline = time.monotonic() + 30
            status, _, _ = get(f"http://127.0.0.1:{port}/block", deadline)
            assert status == 200
            lines = lines_when(errors, event, deadline)
        found = [n for n, text in enumerate(lines) if "blocked" in text]
        assert len(found) == 1, lines
        at = found[0]
        assert event.match(lines[at]), lines
        # The stack: uvicorn's, starlette's and asyncio's frames counted in one line, then
        # the example's blocking line.
        assert lines[at + 1] == "Blocking stack (most recent call last):", lines
        assert re.fullmatch(r"  \(\d+ frames of .*uvicorn.*\)", lines[at + 2]), lines
        assert lines[at + 3] == (
            f'  File "{ROOT / "examples" / "fastapi_app.py"}", line {line}, in block'
        ), lines
        assert "INFO:     Application startup complete." in lines, lines  # uvicorn's own
