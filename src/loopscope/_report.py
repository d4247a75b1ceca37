"""``loopscope report FILE -o report.html``: one self-contained HTML page from a recording
of ``loopscope top --record FILE``.

The plots are SVG drawn here (no script, no style sheet or font fetched: the page opens
without a network): lag p50 and p99, utilization, slow steps per interval, the top
blocking locations, and the slowest steps with their stacks.
"""

from __future__ import annotations

import argparse
import html
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._top_session import read_recording

__all__ = ["add_command", "build_report"]

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")
_WIDTH, _HEIGHT = 860, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 40, 30, 30

Series = dict[str, list[tuple[float, float]]]


def add_command(commands: Any) -> None:
    """Add ``report`` to the ``loopscope`` command's subcommands."""
    report = commands.add_parser(
        "report",
        help="turn a recording of loopscope top into one HTML page",
        description=(
            "Read a recording made with 'loopscope top --record FILE' and write one "
            "self-contained HTML page (no network needed to open it) with the lag "
            "percentiles, utilization, slow steps over time, the top blocking locations and "
            "the slowest steps with their stacks."
        ),
        allow_abbrev=False,
    )
    report.add_argument("recording", metavar="FILE", help="a recording of loopscope top")
    report.add_argument("-o", "--output", metavar="HTML", default="report.html",
                        help="the page to write (default: report.html)")  # fmt: skip
    report.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """``loopscope report``: one-line errors on stderr."""
    try:
        entries = read_recording(args.recording)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"loopscope report: cannot read {args.recording!r} ({exc})", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"loopscope report: {exc}", file=sys.stderr)
        return 2
    page = build_report(entries, title=f"loopscope report: {args.recording}")
    try:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(page)
    except OSError as exc:
        print(f"loopscope report: cannot write {args.output!r} ({exc})", file=sys.stderr)
        return 2
    print(f"loopscope report: wrote {args.output}")
    return 0


def build_report(entries: Sequence[dict[str, Any]], title: str = "loopscope report") -> str:
    """The HTML page for the entries of a recording."""
    lag50: Series = {}
    lag99: Series = {}
    utilization: Series = {}
    slow: Series = {}
    locations: dict[str, list[Any]] = {}
    events: list[dict[str, Any]] = []
    downs: list[tuple[float, str]] = []
    for entry in entries:
        kind = entry.get("kind")
        if kind == "interval":
            at = float(entry.get("time", 0.0))
            for row in entry.get("loops", []):
                name = f"{row.get('loop')} on {row.get('endpoint')}"
                if row.get("lag_p50") is not None:
                    lag50.setdefault(name, []).append((at, float(row["lag_p50"])))
                if row.get("lag_p99") is not None:
                    lag99.setdefault(name, []).append((at, float(row["lag_p99"])))
                utilization.setdefault(name, []).append((at, float(row.get("utilization", 0))))
                slow.setdefault(name, []).append((at, float(row.get("slow_steps", 0))))
            locations[str(entry.get("endpoint"))] = list(entry.get("locations", []))
        elif kind == "event" and isinstance(entry.get("event"), dict):
            events.append(entry["event"])
        elif kind == "down":
            downs.append((float(entry.get("time", 0.0)), str(entry.get("error"))))
    start = next((float(e["time"]) for e in entries if "time" in e), time.time())
    ms = _milliseconds
    lag_series = {f"p99 {k}": v for k, v in lag99.items()}
    lag_series.update({f"p50 {k}": v for k, v in lag50.items()})
    sections = [
        _section("Loop lag (heartbeat), p50 and p99", _line_chart("lag", lag_series, start, ms)),
        _section("Utilization", _line_chart("utilization", utilization, start, _percent, 1.0)),
        _section(
            "Slow steps per interval",
            _line_chart("slow", slow, start, _count, _counts_top(slow), bars=True),
        ),
        _section("Top blocking locations", _locations_chart(locations)),
        _section("Slowest steps, with their stacks", _slowest(events)),
    ]
    if downs:
        items = "".join(f"<li>{_clock(at)}: {html.escape(error)}</li>" for at, error in downs[:50])
        sections.append(_section("Endpoint down", f"<ul>{items}</ul>"))
    begun = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
    return _PAGE.format(
        title=html.escape(title),
        subtitle=html.escape(f"recorded from {begun}, {len(entries)} entries"),
        body="\n".join(sections),
    )


def _section(heading: str, content: str) -> str:
    return f"<section><h2>{html.escape(heading)}</h2>\n{content}\n</section>"


def _milliseconds(value: float) -> str:
    return f"{value * 1000:.3g} ms"


def _percent(value: float) -> str:
    return f"{value:.0%}"


def _count(value: float) -> str:
    return f"{value:.0f}"


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _line_chart(
    name: str,
    series: Series,
    start: float,
    label: Callable[[float], str],
    y_max: float | None = None,
    *,
    bars: bool = False,
) -> str:
    """An SVG chart of ``series`` over time (seconds since ``start``)."""
    points = [p for values in series.values() for p in values]
    if not points:
        return '<p class="empty">nothing was recorded</p>'
    t_end = max(max(t for t, _v in points) - start, 1.0)
    top = y_max if y_max is not None else _nice(max(v for _t, v in points))
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    # Bars: one slot per interval, shared side by side by the series, all within the plot.
    slot = plot_w / max(max(len(values) for values in series.values()), 1) if bars else 0.0
    bar_width = max(1.5, slot * 0.8 / len(series))

    def x(t: float) -> float:
        return _LEFT + slot / 2 + (t - start) / t_end * (plot_w - slot)

    def y(v: float) -> float:
        return _TOP + plot_h - min(v, top) / top * plot_h

    parts = [f'<svg class="chart" data-chart="{name}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{_WIDTH}" height="{_HEIGHT}" viewBox="0 0 {_WIDTH} {_HEIGHT}">',
             f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" '
             'fill="#fafafa" stroke="#999"/>']  # fmt: skip
    for i in range(5):
        value = top * i / 4
        yy = y(value)
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" '
                     'stroke="#ddd"/>')  # fmt: skip
        parts.append(f'<text x="{_LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end">'
                     f"{html.escape(label(value))}</text>")  # fmt: skip
    for i in range(6):
        t = start + t_end * i / 5
        parts.append(f'<text x="{x(t):.1f}" y="{_HEIGHT - 10}" text-anchor="middle">'
                     f"{_clock(t)}</text>")  # fmt: skip
    for index, (series_name, values) in enumerate(sorted(series.items())):
        colour = _COLOURS[index % len(_COLOURS)]
        if bars:
            offset = -slot * 0.4 + index * bar_width
            for t, v in values:
                if v > 0:
                    parts.append(f'<rect class="bar" x="{x(t) + offset:.1f}" y="{y(v):.1f}" '
                                 f'width="{bar_width:.1f}" height="{_TOP + plot_h - y(v):.1f}" '
                                 f'fill="{colour}"/>')  # fmt: skip
        else:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in values)
            parts.append(f'<polyline class="series" fill="none" stroke="{colour}" '
                         f'stroke-width="2" points="{path}"/>')  # fmt: skip
        parts.append(f'<text x="{_LEFT + 8}" y="{_TOP + 14 + 14 * index}" fill="{colour}">'
                     f"{html.escape(series_name)}</text>")  # fmt: skip
    parts.append("</svg>")
    return "\n".join(parts)


def _counts_top(series: Series) -> float:
    """The top of a count axis: whole numbers at each of its five ticks."""
    most = max((v for values in series.values() for _t, v in values), default=0.0)
    return max(4.0, 4.0 * math.ceil(most / 4.0))


def _nice(value: float) -> float:
    """A round number at or above ``value`` for the top of an axis."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    magnitude: float = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _locations_chart(locations: dict[str, list[Any]]) -> str:
    rows = sorted(
        ((float(count), f"{where} ({loop} on {endpoint.split('/')[2]})")
         for endpoint, found in locations.items()
         for loop, where, count in found),
        reverse=True,
    )[:10]  # fmt: skip
    if not rows:
        return '<p class="empty">no slow step was recorded</p>'
    most = rows[0][0] or 1.0
    height = 24 * len(rows) + 10
    parts = [f'<svg class="chart" data-chart="locations" xmlns="http://www.w3.org/2000/svg" '
             f'width="{_WIDTH}" height="{height}" viewBox="0 0 {_WIDTH} {height}">']  # fmt: skip
    for i, (count, text) in enumerate(rows):
        width = max(2.0, count / most * 300)
        yy = 5 + 24 * i
        parts.append(f'<rect class="bar" x="0" y="{yy}" width="{width:.1f}" height="18" '
                     f'fill="{_COLOURS[1]}"/>')  # fmt: skip
        parts.append(f'<text x="{width + 6:.1f}" y="{yy + 14}">{count:.0f} '
                     f"{html.escape(text)}</text>")  # fmt: skip
    parts.append("</svg>")
    return "\n".join(parts)


def _slowest(events: list[dict[str, Any]]) -> str:
    def duration(event: dict[str, Any]) -> float:
        value = event.get("duration", event.get("blocked_for", 0.0))
        try:
            return float(value)
        except (TypeError, ValueError):
            return 0.0

    finished = [e for e in events if e.get("event") != "loop_blocked"] or events
    if not finished:
        return '<p class="empty">no slow step was recorded</p>'
    blocks = []
    for event in sorted(finished, key=duration, reverse=True)[:10]:
        what = (f"task {event.get('task')} ({event.get('coro')})" if event.get("kind") == "task"
                else f"callback {event.get('callback')}")  # fmt: skip
        stack = "\n".join(str(x) for x in event.get("blocking_stack") or []) or "(no stack)"
        at = float(event.get("timestamp") or 0.0)
        blocks.append(
            f'<div class="step"><h3>{duration(event) * 1000:.0f} ms at {_clock(at)} on loop '
            f"{html.escape(str(event.get('loop')))} ({html.escape(str(event.get('endpoint')))}"
            f")</h3><p>{html.escape(what)} blocked at <code>"
            f"{html.escape(str(event.get('location') or 'an unknown line'))}</code></p>"
            f"<pre>{html.escape(stack)}</pre></div>"
        )
    return "\n".join(blocks)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
svg text {{ font-size: 11px; font-family: sans-serif; }}
pre {{ background: #f4f4f4; padding: 0.6em; overflow-x: auto; font-size: 12px; }}
.empty {{ color: #888; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{subtitle}</p>
{body}
</body>
</html>
"""
