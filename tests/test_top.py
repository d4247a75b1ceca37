"""``loopscope top`` without a terminal: its figures, its plain lines, the endpoint going
down and coming back, and a one-line message for every way an endpoint can be wrong."""

from __future__ import annotations

import asyncio
import base64
import collections
import http.server
import io
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import loopscope
from loopscope import _run
from loopscope._top import run_top
from loopscope._top_figures import Endpoint, default_url, normalize_url, quantile
from loopscope._top_format import sparkline
from loopscope._top_session import TopSession

from .ports import free_port
from .test_endpoint_security import Pki

Run = Callable[[Callable[[], Awaitable[Any]]], Any]


def _top(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = _run.main(["top", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _blocking_call() -> None:
    time.sleep(0.15)  # five times the slow threshold: its stack is surely taken


async def _block() -> None:
    await asyncio.sleep(0)
    _blocking_call()


async def _some_work() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


class _Foreign(http.server.BaseHTTPRequestHandler):
    """A web server that is not loopscope: 200 with text on /metrics, 404 elsewhere."""

    def do_GET(self) -> None:
        body = b"hello, I am not loopscope\n"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(name="foreign_port")
def fixture_foreign_port() -> Iterator[int]:
    """The port of a plain HTTP server that is not loopscope."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


class TestErrors:
    """Every way an endpoint can be wrong gets one line on stderr, no traceback."""

    @pytest.mark.parametrize("url", ["ftp://127.0.0.1/metrics", "http://", "http://h:99999/x"])
    def test_bad_url(self, capsys: pytest.CaptureFixture[str], url: str) -> None:
        """A URL that is no http(s) URL: status 2."""
        status, out, err = _top(capsys, url)
        assert status == 2 and out == ""
        assert err.startswith("loopscope top: bad URL") and err.count("\n") == 1

    def test_refused(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Nothing listening: connection refused, status 1."""
        status, _out, err = _top(capsys, f"127.0.0.1:{free_port()}")
        assert status == 1 and "connection refused" in err and err.count("\n") == 1

    def test_not_loopscope(self, capsys: pytest.CaptureFixture[str], foreign_port: int) -> None:
        """A web server that is not loopscope, on /metrics or elsewhere."""
        for url in (f"127.0.0.1:{foreign_port}", f"http://127.0.0.1:{foreign_port}/other"):
            status, _out, err = _top(capsys, url)
            assert status == 1 and "not a loopscope endpoint" in err and err.count("\n") == 1

    def test_credentials(
        self, capsys: pytest.CaptureFixture[str], registry: CollectorRegistry, tmp_path: Path
    ) -> None:
        """No or wrong credentials: 401 named; the right ones: the loop's line; half of
        them: a bad argument."""
        installation = loopscope.install(
            registry=registry, port=0, basic_auth_username="u", basic_auth_password="pw"
        )
        asyncio.run(_some_work())
        url = f"127.0.0.1:{installation.port}"
        wrong, right = tmp_path / "wrong", tmp_path / "right"
        wrong.write_text("nope\n")
        right.write_text("pw\n")
        for extra in ([], ["--user", "u", "--password-file", str(wrong)]):
            status, _out, err = _top(capsys, url, *extra)
            assert status == 1 and "401 Unauthorized" in err and err.count("\n") == 1
        status, out, err = _top(
            capsys, url, "--user", "u", "--password-file", str(right),
            "--interval", "0.1", "--duration", "0.25",
        )  # fmt: skip
        assert status == 0 and err == "" and "loop=MainThread" in out
        status, _out, err = _top(capsys, url, "--password-file", str(right))
        assert status == 2 and "--password-file needs --user" in err
        status, _out, err = _top(capsys, url, "--user", "u")
        assert status == 2 and "--user needs --password-file" in err and err.count("\n") == 1

    def test_tls(
        self, capsys: pytest.CaptureFixture[str], registry: CollectorRegistry, shared_pki: Pki
    ) -> None:
        """An https endpoint: untrusted without --cafile, read with it."""
        installation = loopscope.install(
            registry=registry,
            port=0,
            tls_certfile=str(shared_pki.server_cert),
            tls_keyfile=str(shared_pki.server_key),
        )
        asyncio.run(_some_work())
        url = f"https://127.0.0.1:{installation.port}/metrics"
        status, _out, err = _top(capsys, url)
        assert status == 1 and "--cafile" in err and "not trusted" in err
        status, _out, err = _top(capsys, url.replace("https", "http"))
        assert status == 1 and err.count("\n") == 1
        status, out, err = _top(
            capsys,
            url,
            "--cafile",
            str(shared_pki.ca_cert),
            "--interval",
            "0.1",
            "--duration",
            "0.25",
        )
        assert status == 0 and "loop=MainThread" in out

    def test_terminal_without_rich(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """On a terminal without rich: a message saying what to install."""
        installation = loopscope.install(registry=registry, port=0)
        asyncio.run(_some_work())

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        monkeypatch.setitem(sys.modules, "rich", None)
        monkeypatch.setattr(sys, "stdin", Terminal())
        status = run_top([Endpoint(f"127.0.0.1:{installation.port}")], out=Terminal())
        assert status == 1 and "pip install 'loopscope[top]'" in capsys.readouterr().err


class TestWatching:
    """What top reads and prints."""

    def test_lines_and_events(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """One line per loop and interval, and a line for a slow step with its location."""
        installation = loopscope.install(registry=registry, port=0, slow_threshold=0.03)
        out = io.StringIO()
        done = threading.Event()

        def serve_loop() -> None:
            async def main() -> None:
                blocked = False
                while not done.is_set():
                    await asyncio.sleep(0.02)
                    if not blocked and out.getvalue():  # once top has printed a line
                        _blocking_call()
                        blocked = True

            from .conftest import make_loop

            loop = make_loop(loop_kind)
            try:
                loop.run_until_complete(main())
            finally:
                loop.close()

        thread = threading.Thread(target=serve_loop, name="watched-loop")
        thread.start()
        try:
            time.sleep(0.1)
            endpoint = Endpoint(f"127.0.0.1:{installation.port}")
            status = run_top([endpoint], interval=0.2, duration=1.0, out=out)
        finally:
            done.set()
            thread.join(10)
        text = out.getvalue()
        assert status == 0
        assert f"loop=watched-loop ({loop_kind})" in text
        assert "slow step" in text and "in _blocking_call" in text

    def test_down_and_back(self, registry: CollectorRegistry) -> None:
        """An endpoint that goes away is down, and up again when it returns."""
        installation = loopscope.install(registry=registry, port=0)
        asyncio.run(_some_work())
        port = installation.port
        session = TopSession([Endpoint(f"127.0.0.1:{port}")])
        try:
            session.poll()
            session.poll()
            [watched] = session.watched
            assert watched.down is None and [r.loop for r in watched.rows] == ["MainThread"]
            assert watched.serves_events and "serves no recent" not in _screen(session, 160)
            loopscope.uninstall()
            session.poll()
            assert watched.down is not None and "connection refused" in watched.down
            loopscope.install(registry=CollectorRegistry(), port=port)
            asyncio.run(_some_work())
            session.poll()
            session.poll()
            assert watched.down is None and [r.loop for r in watched.rows] == ["MainThread"]
        finally:
            session.close()

    def test_endpoint_without_events(self, registry: CollectorRegistry) -> None:
        """An endpoint that serves no recent events (events_endpoint off) is named under
        the recent slow steps, rather than left showing none forever."""
        installation = loopscope.install(registry=registry, port=0, events_endpoint=False)
        asyncio.run(_some_work())
        name = f"127.0.0.1:{installation.port}"
        session = TopSession([Endpoint(name)])
        try:
            session.poll()
            session.poll()
            [watched] = session.watched
            assert watched.down is None and not watched.serves_events
            assert f"{name}: serves no recent slow steps" in _screen(session, 160)
        finally:
            session.close()

    def test_record_and_report(
        self, registry: CollectorRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--record writes what report turns into a page; report refuses other files."""
        installation = loopscope.install(registry=registry, port=0)
        asyncio.run(_some_work())
        recording, page = tmp_path / "top.jsonl", tmp_path / "report.html"
        status, _out, _err = _top(
            capsys, f"127.0.0.1:{installation.port}", "--interval", "0.1", "--duration", "0.35",
            "--record", str(recording),
        )  # fmt: skip
        assert status == 0
        assert _run.main(["report", str(recording), "-o", str(page)]) == 0
        html = page.read_text()
        assert "<svg" in html and "MainThread on 127.0.0.1" in html
        (tmp_path / "other.txt").write_text("hello\n")
        assert _run.main(["report", str(tmp_path / "other.txt"), "-o", str(page)]) == 2
        assert "not a loopscope top recording" in capsys.readouterr().err


class TestFigures:
    """The computations top shows."""

    def test_quantile(self) -> None:
        """Interpolated within its bucket; the last finite bound for the +Inf bucket."""
        before = {0.01: 0.0, 0.1: 0.0, float("inf"): 0.0}
        after = {0.01: 50.0, 0.1: 100.0, float("inf"): 100.0}
        assert quantile(before, after, 0.5) == pytest.approx(0.01)
        assert quantile(before, after, 0.75) == pytest.approx(0.055)
        assert quantile(after, after, 0.5) is None
        assert quantile({}, {0.01: 0.0, float("inf"): 4.0}, 0.99) == 0.01

    def test_urls(self) -> None:
        """host:port is the /metrics of that endpoint; the default follows LOOPSCOPE_PORT."""
        assert normalize_url("h:9") == "http://h:9/metrics"
        assert normalize_url("https://h:9/") == "https://h:9/metrics"
        assert default_url({}) == "http://127.0.0.1:9100/metrics"
        assert default_url({"LOOPSCOPE_PORT": "9200"}) == "http://127.0.0.1:9200/metrics"

    def test_sparkline(self) -> None:
        """Scaled to the largest value (or the top given); a gap stays a gap."""
        assert sparkline([0.0, 0.5, 1.0, None], 10) == "▁▅█ "
        assert sparkline([0.5] * 20, 4, top=1.0) == "▅▅▅▅"


def _screen(session: TopSession, width: int) -> str:
    """What the terminal view shows of ``session`` on a terminal ``width`` columns wide."""
    from rich.console import Console

    from loopscope._top_view import View, render

    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    console.print(render(session, View(), width, 40))
    return console.export_text()


class TestTerminalWidth:
    """The loops' table of the terminal view on terminals of different widths."""

    @staticmethod
    def _table(width: int) -> list[str]:
        from loopscope._top_figures import LoopRates

        session = TopSession([Endpoint("127.0.0.1:19182")])
        watched = session.watched[0]
        for loop in ("MainThread", "worker-loop-1"):
            watched.rows.append(LoopRates("127.0.0.1:19182", loop, "uvloop", 1.0, 6e-6, 0.375,
                                          0.54, 1384, 12, 7, 2, 0.486, 3, 32, 0.0995))  # fmt: skip
            watched.history[loop] = collections.deque([(0.3, 0.5)] * 600)
        return _screen(session, width).splitlines()[1:4]  # the header and the two loops

    @pytest.mark.parametrize("width", [80, 110, 130, 160])
    def test_figures_are_never_cut(self, width: int) -> None:
        """Columns that do not fit go whole (history first); what is shown is never cut."""
        header, *rows = self._table(width)
        assert "…" not in "".join([header, *rows])
        assert all(len(line) <= width for line in [header, *rows])
        for row in rows:
            assert "MainThread (uvloop)" in row or "worker-loop-1 (uvloop)" in row
            assert "375ms" in row and "54%" in row
        assert ("queue p99" in header) == (width >= 130)
        assert ("lag p99 history" in header) == (width >= 160)


def test_basic_token_is_standard() -> None:
    """The Authorization header top sends is standard basic authentication."""
    endpoint = Endpoint("h:1", user="u", password="p:w")
    token = base64.b64encode(b"u:p:w").decode()
    assert endpoint._headers["Authorization"] == f"Basic {token}"


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """``loopscope --help`` lists run, top and report."""
    with pytest.raises(SystemExit):
        _run.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"    {name} " in out for name in ("run", "top", "report"))
