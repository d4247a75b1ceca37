"""The terminal view of ``loopscope top``, drawn with ``rich``: a table of loops with
sparklines, the top blocking locations, and the recent slow steps with the stack of the
latest.  Imported only when ``rich`` is there and the output is a terminal."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ._top_figures import LoopRates
from ._top_format import SORTS, event_duration, event_what, seconds_text, sparkline
from ._top_session import TopSession, Watched

__all__ = ["View", "render", "run_live"]

#: Columns of history shown at least (the sparklines take what the width leaves): as many
#: as their headings take.
_MIN_SPARK = len("lag p99 history")


@dataclass
class View:
    """What the keys changed."""

    paused: bool = False
    sort: int = 0
    #: (endpoint, loop) picked with ``l``; None: every loop.
    picked: tuple[str, str] | None = None

    def handle(self, key: str, session: TopSession) -> bool:
        """Apply ``key``; False when it asks to quit."""
        if key in ("q", "Q"):
            return False
        if key in ("p", "P", " "):
            self.paused = not self.paused
        elif key in ("s", "S"):
            self.sort = (self.sort + 1) % len(SORTS)
        elif key in ("l", "L"):
            loops = [(r.endpoint, r.loop) for w in session.watched for r in w.rows]
            choices: list[tuple[str, str] | None] = [None, *sorted(set(loops))]
            at = choices.index(self.picked) if self.picked in choices else 0
            self.picked = choices[(at + 1) % len(choices)]
        return True

    def shows(self, endpoint: str, loop: str) -> bool:
        return self.picked is None or self.picked == (endpoint, loop)


def run_live(session: TopSession, interval: float, duration: float) -> None:
    """Draw ``session`` until ``q``, Ctrl-C or ``duration`` seconds (0: no end)."""
    console = Console()
    _follow_terminal(console)
    view = View()
    resized = [False]
    fd = sys.stdin.fileno()
    started = time.monotonic()
    next_poll = started + interval
    with (
        stopped_by_signals(),
        cbreak(fd),
        on_resize(resized),
        Live(
            render(session, view, console.size.width, console.size.height),
            console=console,
            screen=True,
            auto_refresh=False,
        ) as live,
    ):
        while duration <= 0 or time.monotonic() - started < duration:
            now = time.monotonic()
            redraw = False
            if now >= next_poll:
                next_poll = max(next_poll + interval, now + interval / 2)
                if not view.paused:
                    session.poll()
                    redraw = True
            # Short waits: a resize (whose signal select() retries through) is seen soon.
            for key in read_keys(fd, min(0.2, max(0.0, next_poll - time.monotonic()))):
                if not view.handle(key, session):
                    return
                redraw = True
            if resized[0]:
                resized[0] = False
                redraw = True
            if redraw:
                _follow_terminal(console)
                size = console.size
                live.update(render(session, view, size.width, size.height), refresh=True)


def _follow_terminal(console: Console) -> None:
    """Size ``console`` as the terminal is now: asked of the terminal itself, since rich
    (like ``shutil``) would take an exported ``COLUMNS``/``LINES`` and never see a resize."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        return
    console.size = (size.columns, size.lines)


def render(session: TopSession, view: View, width: int, height: int) -> RenderableType:
    """The whole screen for a terminal of ``width`` x ``height`` characters."""
    sort_name = SORTS[view.sort][0]
    header = Text()
    header.append("loopscope top", style="bold")
    header.append(f"  {len(session.watched)} endpoint(s)  sort: {sort_name}  ")
    if view.picked is not None:
        header.append(f"loop: {view.picked[1]} on {view.picked[0]}  ", style="bold cyan")
    if view.paused:
        header.append("PAUSED  ", style="bold reverse yellow")
    header.append("q quit  p pause  s sort  l loop", style="dim")
    parts: list[RenderableType] = [header, _loops_table(session, view, width)]
    for watched in session.watched:
        if watched.down is not None:
            parts.append(Text(f"DOWN {watched.down}", style="bold red"))
    # What remains of the height goes to the locations and the slow steps.
    room = max(4, height - 6 - sum(len(w.rows) or 1 for w in session.watched))
    parts.append(Text("top blocking locations (slow steps since attached)", style="bold"))
    parts.append(_locations_table(session, view, max(1, room // 3)))
    parts.append(Text("recent slow steps", style="bold"))
    parts.append(_events_part(session, view, max(2, room - room // 3 - 3), width))
    return Group(*parts)


#: The figure columns of the loops' table, and the order in which they give way on a
#: narrow terminal (after the history): the loop's name, its lag p99, utilization and slow
#: steps always stay.
_COLUMNS = ("endpoint", "loop", "lag p50", "lag p99", "util", "steps/s", "tasks", "new/s",
            "slow", "blocked", "executors", "queue p99")  # fmt: skip
_GIVE_WAY = ("queue p99", "executors", "new/s", "tasks", "lag p50", "steps/s", "blocked")
#: Blank columns between two columns of a table (rich's padding, without a box).
_GAP = 2
_WAITING = "(waiting for a second read)"


def _loops_table(session: TopSession, view: View, width: int) -> Table:
    rows: list[tuple[Watched, LoopRates]] = [
        (w, r) for w in session.watched for r in w.rows if view.shows(r.endpoint, r.loop)
    ]
    key = SORTS[view.sort][1]
    rows.sort(key=lambda pair: key(pair[1]))
    cells = [_figures(row) for _w, row in rows]
    waiting = [w.endpoint.name for w in session.watched if w.down is None and not w.rows]
    # Each column as wide as its widest cell: the columns that do not fit go, figures are
    # never cut short.
    widths = {name: max([len(name)] + [Text(c[name]).cell_len for c in cells]) for name in _COLUMNS}
    if waiting:
        widths["endpoint"] = max([widths["endpoint"]] + [len(name) for name in waiting])
        widths["loop"] = max(widths["loop"], len(_WAITING))
    shown = list(_COLUMNS)
    for name in _GIVE_WAY:
        if sum(widths[n] for n in shown) + _GAP * (len(shown) - 1) <= width:
            break
        shown.remove(name)
    used = sum(widths[n] for n in shown) + _GAP * (len(shown) - 1)
    # The history columns take what the figures leave.
    spark = (width - used - 2 * _GAP) // 2
    with_history = spark >= _MIN_SPARK
    table = Table(expand=False, box=None, header_style="bold", pad_edge=False)
    for name in shown:
        if name in ("endpoint", "loop"):
            table.add_column(name, no_wrap=True)
        else:
            table.add_column(name, justify="right", no_wrap=True)
    if with_history:
        table.add_column("lag p99 history", no_wrap=True)
        table.add_column("util history", no_wrap=True)
    for (watched, row), figures in zip(rows, cells, strict=True):
        line: list[RenderableType] = [
            Text(figures[name], style=_STYLES.get(name, lambda _r: "")(row)) for name in shown
        ]
        if with_history:
            history = list(watched.history.get(row.loop, ()))
            lag_line = sparkline([lag for lag, _u in history], spark)
            util_line = sparkline([util for _l, util in history], spark, top=1.0)
            line += [Text(lag_line, style="magenta"), Text(util_line, style="green")]
        table.add_row(*line)
    for name in waiting:
        table.add_row(Text(name), _WAITING)
    return table


#: The colour of a figure that calls for attention.
_STYLES = {
    "lag p99": lambda row: "red" if (row.lag_p99 or 0) >= 0.1 else "",
    "slow": lambda row: "red" if row.slow_steps else "",
}


def _figures(row: LoopRates) -> dict[str, str]:
    """The cells of one loop's row, by column."""
    executors = f"{row.executors_busy:.0f}/{row.executors_max:.0f}" if row.executors_max else "-"
    return {
        "endpoint": row.endpoint,
        "loop": f"{row.loop} ({row.implementation})",
        "lag p50": seconds_text(row.lag_p50),
        "lag p99": seconds_text(row.lag_p99),
        "util": f"{row.utilization:.0%}",
        "steps/s": f"{row.steps_per_second:.0f}",
        "tasks": f"{row.tasks_alive:.0f}",
        "new/s": f"{row.tasks_created_per_second:.0f}",
        "slow": f"{row.slow_steps:.0f}",
        "blocked": f"{row.blocked_seconds:.3f}s",
        "executors": executors,
        "queue p99": seconds_text(row.queue_p99),
    }


def _locations_table(session: TopSession, view: View, lines: int) -> Table:
    table = Table(box=None, header_style="dim", pad_edge=False)
    table.add_column("slow", justify="right")
    table.add_column("endpoint")
    table.add_column("loop")
    table.add_column("location")
    found: list[tuple[float, str, str, str]] = []
    for watched in session.watched:
        for (loop, where), count in watched.locations().items():
            if view.shows(watched.endpoint.name, loop):
                found.append((count, watched.endpoint.name, loop, where))
    found.sort(key=lambda item: -item[0])
    for count, endpoint, loop, where in found[:lines]:
        table.add_row(f"{count:.0f}", endpoint, loop, where)
    if not found:
        table.add_row("", "", "", Text("(no slow step yet)", style="dim"))
    return table


def _events_part(session: TopSession, view: View, lines: int, width: int) -> RenderableType:
    events = [
        e for w in session.watched for e in w.events
        if view.shows(str(e.get("endpoint")), str(e.get("loop")))
    ]  # fmt: skip
    events.sort(key=lambda e: float(e.get("timestamp") or 0.0))
    table = Table(box=None, header_style="dim", pad_edge=False)
    for name in ("time", "endpoint", "loop", "duration", "what", "location"):
        table.add_column(name, no_wrap=name != "location")
    stack_lines = min(8, max(0, lines // 2))
    shown = events[-max(1, lines - stack_lines - 2) :]
    for event in reversed(shown):
        stamp = time.strftime("%H:%M:%S", time.localtime(float(event.get("timestamp") or 0)))
        table.add_row(
            stamp,
            str(event.get("endpoint")),
            str(event.get("loop")),
            event_duration(event),
            event_what(event),
            str(event.get("location") or "(unknown)"),
        )
    parts: list[RenderableType] = [table]
    silent = [w.endpoint.name for w in session.watched if not w.serves_events]
    if silent:
        parts.append(Text(
            f"{', '.join(silent)}: serves no recent slow steps (loopscope's events_endpoint "
            "option is off there, or it is an application's own /metrics route)",
            style="dim",
        ))  # fmt: skip
    if not events:
        table.add_row("", "", "", "", Text("(none yet)", style="dim"), "")
        return Group(*parts)
    latest = events[-1]
    stack = Text(f"stack of the latest ({event_duration(latest)} on {latest.get('endpoint')} "
                 f"at {latest.get('location') or 'an unknown line'}):\n", style="bold")  # fmt: skip
    stack.append("\n".join(_stack_lines(latest, stack_lines, width)))
    return Group(*parts, stack)


def _stack_lines(event: dict[str, Any], lines: int, width: int) -> list[str]:
    """The last ``lines`` entries of the event's blocking stack, most recent call last."""
    entries = [str(x) for x in event.get("blocking_stack") or []][-lines:] if lines else []
    shown = []
    for entry in entries:
        text = f"  {entry}"
        shown.append(text if len(text) <= width else "  ..." + text[-(width - 5) :])
    return shown or ["  (no stack: the step ended before it was taken)"]


# --- the terminal ---------------------------------------------------------------------


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """The terminal of ``fd`` in cbreak mode (keys come one by one, not echoed) until the
    block ends, however it ends."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def read_keys(fd: int, timeout: float) -> str:
    """The keys typed within ``timeout`` seconds ("" when none)."""
    ready, _w, _x = select.select([fd], [], [], max(0.0, timeout))
    if not ready:
        return ""
    return os.read(fd, 64).decode("utf-8", "replace")


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """In the block, SIGTERM and SIGHUP (a ``kill``, the terminal closing) stop the view as
    Ctrl-C does, so that the terminal is given back as it was (main screen, cursor shown,
    keys echoed) rather than left as the view had set it."""

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    wanted = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {sig: signal.signal(sig, stop) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def on_resize(flag: list[bool]) -> Iterator[None]:
    """``flag[0]`` set True whenever the terminal is resized (SIGWINCH), in the block."""
    if not hasattr(signal, "SIGWINCH"):
        yield
        return

    def resized(_signum: int, _frame: object) -> None:
        flag[0] = True

    previous = signal.signal(signal.SIGWINCH, resized)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)
