"""``loopscope report``: the page opens in a browser without a network and its plots draw
(headless Chromium: the DOM it built, a screenshot, and no console error)."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from loopscope._report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: The colours of the first two series and of the location bars (see _report._COLOURS).
BLUE, RED = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)


def _recording() -> list[dict[str, object]]:
    """A recording of two loops over twenty seconds, with slow steps on one."""
    start = 1_800_000_000.0
    entries: list[dict[str, object]] = [{"kind": "start", "format": 1, "time": start}]
    for second in range(20):
        loops = []
        for loop, base in (("MainThread", 0.002), ("worker", 0.0005)):
            blocked = loop == "MainThread" and second % 5 == 2
            loops.append({
                "endpoint": "127.0.0.1:9100", "loop": loop, "implementation": "uvloop",
                "lag_p50": base, "lag_p99": 0.3 if blocked else base * 3,
                "utilization": 0.2 + second / 40, "slow_steps": 1 if blocked else 0,
            })  # fmt: skip
        entries.append({
            "kind": "interval", "time": start + second, "endpoint": "http://127.0.0.1:9100/metrics",
            "loops": loops,
            "locations": [["MainThread", "app/handlers.py:42 in get_user", 4]],
        })  # fmt: skip
    entries.append({
        "kind": "event", "endpoint": "http://127.0.0.1:9100/metrics",
        "event": {
            "event": "slow_callback", "loop": "MainThread", "kind": "task", "task": "Task-7",
            "coro": "handle", "duration": 0.3, "timestamp": start + 2,
            "endpoint": "127.0.0.1:9100", "location": "app/handlers.py:42 in get_user",
            "blocking_stack": ["app/server.py:10 in handle", "app/handlers.py:42 in get_user"],
        },
    })  # fmt: skip
    entries.append({"kind": "down", "time": start + 20, "endpoint": "x", "error": "refused <b>"})
    return entries


def _pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and rows (RGB or RGBA bytes) of an 8-bit, non-interlaced PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    at, data, header = 8, b"", b""
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, body = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            data += body
        at += 12 + length
    width, height, depth, colour, _c, _f, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0
    size = 3 if colour == 2 else 4
    raw, rows, previous = zlib.decompress(data), [], bytearray(width * size)
    stride = width * size + 1
    for y in range(height):
        kind, line = raw[y * stride], bytearray(raw[y * stride + 1 : (y + 1) * stride])
        if kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, previous, strict=True))
            kind = 0
        for i in range(len(line) if kind else 0):
            left = line[i - size] if i >= size else 0
            up, corner = previous[i], previous[i - size] if i >= size else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                best = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + best) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, [bytes(r) for r in rows]


def _count(rows: list[bytes], size: int, colour: tuple[int, int, int]) -> int:
    found = 0
    for row in rows:
        for x in range(0, len(row), size):
            if all(abs(row[x + i] - colour[i]) <= 6 for i in range(3)):
                found += 1
    return found


@pytest.fixture(scope="module", name="rendered")
def fixture_rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes, str]:
    """The report of a recording rendered by headless Chromium: its DOM, a screenshot and
    what the browser logged."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium (Debian's package)")
        pytest.skip("needs chromium")
    root = tmp_path_factory.mktemp("report")
    page, shot = root / "report.html", root / "shot.png"
    page.write_text(build_report(_recording()), encoding="utf-8")
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={root / 'profile'}", "--window-size=1000,1400",
         "--force-device-scale-factor=0.5",
         f"--screenshot={shot}", "--dump-dom", "--enable-logging=stderr", "--v=0",
         page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, Path(shot).read_bytes(), result.stderr


class TestReportInChromium:
    """The page as a browser shows it."""

    def test_plots_in_the_dom(self, rendered: tuple[str, bytes, str]) -> None:
        """The browser built every plot: lines, bars, the locations and the stacks."""
        dom, _shot, _log = rendered
        for chart in ("lag", "utilization", "slow", "locations"):
            assert f'data-chart="{chart}"' in dom
        assert dom.count("<polyline") == 6  # lag p50 and p99, utilization; two loops
        assert 'class="bar"' in dom and "app/handlers.py:42 in get_user" in dom
        assert "app/server.py:10 in handle" in dom and "refused &lt;b&gt;" in dom

    def test_screenshot_shows_the_plots(self, rendered: tuple[str, bytes, str]) -> None:
        """The screenshot has the series' colours: the plots were painted."""
        _dom, shot, _log = rendered
        width, height, rows = _pixels(shot)
        size = len(rows[0]) // width
        assert (width, height) == (500, 700)  # the window at half scale: decoded faster
        assert _count(rows, size, BLUE) > 100
        assert _count(rows, size, RED) > 100

    def test_no_console_error_and_no_network(self, rendered: tuple[str, bytes, str]) -> None:
        """Nothing went wrong in the page, and it asks for nothing over the network."""
        dom, _shot, log = rendered
        assert "CONSOLE" not in log and "Uncaught" not in log
        assert "http://" not in dom.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "<script" not in dom and "https://" not in dom


def test_slow_step_bars_side_by_side_within_the_plot() -> None:
    """Two loops with slow steps in the same intervals: each loop's bar is drawn beside the
    other's, none hides another, and every bar stays inside the plot."""
    start = 1_800_000_000.0
    entries: list[dict[str, object]] = [{"kind": "start", "format": 1, "time": start}]
    for second in range(1, 11):
        loops = [{"endpoint": "h:1", "loop": loop, "utilization": 0.5, "slow_steps": 2}
                 for loop in ("MainThread", "worker")]  # fmt: skip
        entries.append({"kind": "interval", "time": start + second, "loops": loops})
    page = build_report(entries)
    chart = page[
        page.index('data-chart="slow"') : page.index("</svg>", page.index('data-chart="slow"'))
    ]
    bars = [
        (float(x), float(width), fill)
        for x, width, fill in re.findall(
            r'<rect class="bar" x="([\d.]+)" y="[\d.]+" width="([\d.]+)" height="[\d.]+" '
            r'fill="(#\w+)"/>',
            chart,
        )
    ]
    assert len(bars) == 20 and {fill for _x, _w, fill in bars} == {"#1f77b4", "#d62728"}
    frame = re.search(r'<rect x="(\d+)" y="\d+" width="(\d+)"', chart)
    assert frame is not None
    left, right = float(frame.group(1)), float(frame.group(1)) + float(frame.group(2))
    spans = sorted((x, x + width) for x, width, _fill in bars)
    assert spans[0][0] >= left and spans[-1][1] <= right
    # (to the 0.1 px the coordinates are written with)
    assert all(a_end <= b_start + 0.15 for (_a, a_end), (b_start, _b) in itertools.pairwise(spans))
