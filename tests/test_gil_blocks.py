"""Blocks inside C calls that hold the GIL are located while they last.

``json.loads`` of a large body, a backtracking regular expression and ``sorted()`` of a
long list keep the GIL for their whole call, so the watchdog cannot take the loop thread's
stack with ``sys._current_frames()`` until the call returns.  The GIL reader
(``loopscope._gilreader``) reads it meanwhile: the first ``loop_blocked`` event of such a
step comes with a ``blocked_for`` well below the step's length and names the line that
made the call, and so does the step's ``slow_callback``.

Each call is sized to block the loop for about 0.6 s on the machine that runs the tests;
nothing here depends on that length beyond "the first report is older than the threshold
and younger than the step by a threshold".
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from array import array
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

import loopscope
from loopscope import _gilreader
from loopscope._instrument import Instrument, LoopBlocked, SlowStep

from .conftest import make_loop

THRESHOLD = 0.1
#: The first report of a block comes at one threshold's age (loop_blocked_after is set to
#: the threshold): within this bound on a busy machine, well below the blocks' length.
FIRST_REPORT_BOUND = 3 * THRESHOLD

#: Where the reader is built to work: under CI it must be on there.
_SUPPORTED = sys.platform.startswith("linux") and (3, 10) <= sys.version_info[:2] <= (3, 13)
pytestmark = pytest.mark.skipif(
    _gilreader.status() != "on" and not (os.environ.get("CI") and _SUPPORTED),
    reason=f"the GIL reader is off here: {_gilreader.status()}",
)

#: How long each call below blocks the loop (seconds), on whatever machine runs the tests:
#: the inputs are scaled from a short run of each call when first needed.
BLOCK = 0.6


def _timed(call: Callable[[], object]) -> float:
    """The processor time ``call`` takes: wall time would depend on how busy the machine
    is while the inputs are sized, and a block sized on a busy machine then lasts a
    fraction of BLOCK on a quiet one (a backtracking match's time doubles per character)."""
    start = time.thread_time()
    call()
    return max(time.thread_time() - start, 1e-6)


@functools.cache
def _inputs() -> tuple[str, str, list[int]]:
    """The subject of the backtracking pattern, a JSON body and a list of random numbers,
    each sized for a call of about BLOCK seconds here (a regular expression's time doubles
    with each character; the others grow with their length)."""
    length = 18
    took = min(_timed(lambda: re.match(r"(a+)+$", "a" * length + "b")) for _ in range(2))
    length = min(30, max(length, length + round(math.log2(BLOCK / took))))
    item = '{"k": 123456, "v": "xxxxxxxxxxxxxxxxxxxx"}'
    items = 100_000
    body = "[" + ",".join([item] * items) + "]"
    took = min(_timed(lambda: json.loads(body)) for _ in range(2))
    items = min(3_000_000, int(items * BLOCK / took))
    numbers = array("H", os.urandom(2 * 500_000)).tolist()
    took = min(_timed(lambda: sorted(numbers)) for _ in range(2))
    count = min(5_000_000, int(len(numbers) * BLOCK / took))
    return (
        "a" * length + "b",
        "[" + ",".join([item] * items) + "]",
        array("H", os.urandom(2 * count)).tolist(),
    )


@pytest.fixture(autouse=True, scope="module")
def _sized_inputs() -> None:
    """The inputs are sized before any loop runs: sizing them inside a measured step would
    make a block of its own, partly in Python code."""
    _inputs()


@pytest.fixture(autouse=True)
def _no_gc_callbacks() -> Iterator[None]:
    """The garbage collector's callbacks that other tests of this process left (hypothesis
    installs one) are set aside: a collection inside ``json.loads`` runs them in Python,
    and a stack read then would name their line instead of the blocking call.  (The
    collector calls the list ``gc.callbacks`` is, so it is emptied, not replaced.)"""
    kept = list(gc.callbacks)
    gc.callbacks.clear()
    try:
        yield
    finally:
        gc.callbacks[:] = kept + gc.callbacks


def _calling_line(function: Callable[..., object], text: str) -> str:
    """``"tests/test_gil_blocks.py:N in function"`` for the line of ``function`` that
    contains ``text`` (as ``application_location`` names it)."""
    code = function.__code__
    with open(code.co_filename, encoding="utf-8") as source:
        lines = source.read().splitlines()
    for number in range(code.co_firstlineno, len(lines) + 1):
        if text in lines[number - 1]:
            return f"tests/test_gil_blocks.py:{number} in {code.co_name}"
    raise AssertionError(f"{text!r} is not in {code.co_name}")


def parse_body() -> None:
    json.loads(_inputs()[1])


def match_pattern() -> None:
    re.match(r"(a+)+$", _inputs()[0])


def sort_numbers() -> None:
    sorted(_inputs()[2])


CALLS = {
    "json.loads": (parse_body, "json.loads("),
    "re.match": (match_pattern, "re.match("),
    "sorted": (sort_numbers, "sorted("),
}


class Events(Instrument):
    """Every event, with the thread it was delivered on."""

    def __init__(self) -> None:
        self.events: list[SlowStep | LoopBlocked] = []

    def slow_step(self, event: SlowStep) -> None:
        self.events.append(event)

    def loop_blocked(self, event: LoopBlocked) -> None:
        self.events.append(event)

    def of_step(self, started: float) -> tuple[list[LoopBlocked], SlowStep]:
        """The loop_blocked events of the step that started at ``started``, in the order
        they came, and its slow_callback."""
        blocked = [e for e in self.events if isinstance(e, LoopBlocked) and e.started == started]
        slow = [e for e in self.events if isinstance(e, SlowStep) and e.started == started]
        assert len(slow) == 1, self.events
        return blocked, slow[0]

    def summary(self) -> list[tuple[str, float, float, str | None]]:
        """Each event's kind, step start, duration or time blocked, and location: what a
        failure shows (the stacks are long)."""
        return [
            (
                type(e).__name__,
                e.started,
                getattr(e, "duration", getattr(e, "blocked_for", 0.0)),
                e.location,
            )
            for e in self.events
        ]

    def slow_steps(self) -> list[SlowStep]:
        """The slow steps of the blockers (not any other step a busy machine made slow)."""
        return [
            e
            for e in self.events
            if isinstance(e, SlowStep) and e.coro is not None and e.coro.endswith(".step")
        ]

    def wait_for_blocks(self, timeout: float = 10.0) -> None:
        """Wait until every slow step has a loop_blocked event: a block the watchdog could
        not see before its step ended is handed to it by the step's own report, and
        reported by the watchdog's thread a moment later (within ``timeout`` seconds: a
        bound for a busy machine, not a measure)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            started = {e.started for e in self.events if isinstance(e, LoopBlocked)}
            if all(slow.started in started for slow in self.slow_steps()):
                return
            time.sleep(0.01)


@pytest.fixture(name="events")
def fixture_events(registry: CollectorRegistry) -> Iterator[Events]:
    """loopscope installed with a 0.1 s threshold, its first report of a block at 0.1 s."""
    events = Events()
    loopscope.install(
        registry=registry,
        slow_threshold=THRESHOLD,
        loop_blocked_after=THRESHOLD,
        events="off",  # no stderr reports in the test's output; instruments get every event
        instruments=(events,),
    )
    yield events
    loopscope.uninstall()


def _run_steps(loop_kind: str, blockers: list[Callable[[], None]]) -> None:
    """Run each blocker in a task step of its own on a fresh loop."""

    async def main() -> None:
        for blocker in blockers:

            async def step(blocker: Callable[[], None] = blocker) -> None:
                blocker()

            await asyncio.create_task(step())

    loop = make_loop(loop_kind)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class TestGilHoldingCalls:
    """Each call is reported while it lasts, at the line that made it."""

    def test_reported_while_it_lasts(self, loop_kind: str, events: Events) -> None:
        """For json.loads, re.match and sorted: the step's first loop_blocked is younger
        than the step by at least a threshold, within three thresholds, on the watchdog's
        thread, and names the calling line, as does the step's slow_callback."""
        _inputs()
        _run_steps(loop_kind, [blocker for blocker, _ in CALLS.values()])
        events.wait_for_blocks()
        slow_steps = events.slow_steps()
        assert len(slow_steps) == len(CALLS), events.events
        for (name, (blocker, text)), slow in zip(CALLS.items(), slow_steps, strict=True):
            line = _calling_line(blocker, text)
            blocked, slow = events.of_step(slow.started)
            assert blocked, f"{name}: no loop_blocked event ({slow}); events: {events.summary()}"
            first = blocked[0]
            assert first.location == line, (name, first)
            assert first.blocked_for <= FIRST_REPORT_BOUND, (name, first.blocked_for)
            assert first.blocked_for <= slow.duration - THRESHOLD, (name, first, slow)
            assert first.thread == "loopscope-watchdog"
            assert any(entry.endswith(f" in {blocker.__name__}") for entry in first.blocking_stack)
            assert slow.location == line, (name, slow)


class TestHandOver:
    """A block the reader saw in a step that ended before the watchdog could look is
    reported by the watchdog all the same."""

    def test_after_an_earlier_sample_of_the_step(self, loop_kind: str, events: Events) -> None:
        """The watchdog sampled the step before its first report was due (a stretch that
        held the GIL before the long call, or a thread descheduled on a busy machine), and
        the reader's capture at the report's age came after that sample: the step's own
        report hands that capture over, and the watchdog reports the block from it."""
        from loopscope import _installation

        loop = make_loop(loop_kind)
        try:
            loop.run_until_complete(asyncio.sleep(0))
            installation = _installation.current()
            assert installation is not None
            probe = installation.probe_for(loop)
            assert probe is not None
            start = time.monotonic() - 1.0
            early = ["tests/test_gil_blocks.py:1 in earlier"]
            late = [f"tests/test_gil_blocks.py:{n} in parse_body" for n in (2, 3)]
            captured = [
                _gilreader.Capture(10**9, start, start + 0.5 * THRESHOLD, early),
                _gilreader.Capture(10**9 + 1, start, start + 1.02 * THRESHOLD, late),
            ]
            # The watchdog's sample, taken from the first capture: no report was due yet.
            probe.gil_seen = captured[0].seq
            probe.sample = (start, early, early[0])
            original = _gilreader.captures
            _gilreader.captures = lambda handle, after: [c for c in captured if c.seq > after]
            try:
                probe.record_slow(None, None, start, 0.5)
            finally:
                _gilreader.captures = original
            deadline = time.monotonic() + 10.0  # a bound for a busy machine, not a measure
            while time.monotonic() < deadline and not events.of_step(start)[0]:
                time.sleep(0.01)
        finally:
            loop.close()
        blocked, slow = events.of_step(start)
        assert slow.location == early[0]  # the step is named by what the watchdog sampled
        assert [(b.location, round(b.blocked_for, 3)) for b in blocked] == [
            (late[-1], round(1.02 * THRESHOLD, 3))
        ]
        assert blocked[0].thread == "loopscope-watchdog"

    @pytest.mark.parametrize("next_step", ["began", "not yet"])
    def test_handed_over_while_the_watchdog_looks(
        self, loop_kind: str, events: Events, next_step: str
    ) -> None:
        """The watchdog passed its hand-overs, then lost the GIL before it read the loop's
        step marker: meanwhile the step ended and handed its capture over.

        - "began": the next step began too, and the watchdog took up that step's capture
          while it ran; the hand-over is reported all the same, at the next check, and
          its report leaves the running step's schedule of reports as it was.
        - "not yet": the marker the watchdog read was still the ended step's, so it took
          up the capture as the running step's and reported it; the hand-over is not
          reported a second time.

        The watchdog's thread is stopped and its checks run in a step of the loop (which
        has the reader's registration while it runs), with the GIL lost where it can be:
        in the reader's ``captures()``, which releases it."""
        from loopscope import _installation

        installation = _installation.current()
        assert installation is not None
        watchdog = installation.watchdog
        first = time.monotonic() - 2.0
        second = first + 0.7
        ended = _gilreader.Capture(
            10**9, first, first + 1.02 * THRESHOLD, ["tests/test_gil_blocks.py:1 in ended"]
        )
        running = _gilreader.Capture(
            10**9 + 1, second, second + 1.02 * THRESHOLD, ["tests/test_gil_blocks.py:2 in next"]
        )

        async def scenario() -> None:
            probe = installation.probe_for(asyncio.get_running_loop())
            assert probe is not None and probe.gil_handle >= 0
            marks = probe.recorder
            available = [ended]
            watchdog_calls = []

            def captures(handle: int, after: int) -> list[_gilreader.Capture]:
                if not watchdog_calls:
                    watchdog_calls.append(after)
                    # The watchdog waits for the GIL: the loop thread ends the step...
                    marks.current_start = 0.0
                    probe.record_slow(None, None, first, 0.6)
                    if next_step == "began":  # ...and the next begins and is read
                        marks.current_start = second
                        available[:] = [running]
                return [c for c in available if c.seq > after]

            watchdog.stop()
            marks.current_start = second if next_step == "began" else first
            original = _gilreader.captures
            _gilreader.captures = captures
            try:
                watchdog.check(installation)
                watchdog.check(installation)  # takes up the hand-over
            finally:
                _gilreader.captures = original
            assert watchdog_calls

        loop = make_loop(loop_kind)
        try:
            loop.run_until_complete(scenario())
        finally:
            loop.close()
        blocked, slow = events.of_step(first)
        assert slow.location == "tests/test_gil_blocks.py:1 in ended"
        assert [(b.location, round(b.blocked_for, 3)) for b in blocked] == [
            ("tests/test_gil_blocks.py:1 in ended", round(1.02 * THRESHOLD, 3))
        ]
        if next_step == "began":
            # The next step: its capture, then (the first check) its stack at its age of
            # about 1.3 s, which the second check does not report again: the hand-over's
            # report kept to its own step's schedule.
            later = [e for e in events.events if isinstance(e, LoopBlocked) and e.started == second]
            assert [e.location for e in later][:1] == ["tests/test_gil_blocks.py:2 in next"]
            assert len(later) == 2, later

    def test_while_the_watchdog_starts(
        self, loop_kind: str, events: Events, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The watchdog's thread runs Python code before its first wait, and so needs the
        GIL: a call that takes the GIL meanwhile is read by the reader all the same, and
        reported.  (The thread is kept in that code for a moment here, as a thread that
        was just started can be on a busy machine.)"""
        from loopscope import _installation
        from loopscope._watchdog import Watchdog

        starting = threading.Event()
        sees_every_step = Watchdog._wait_sees_every_step

        def slow_first_look(watchdog: Watchdog, installation: _installation.Installation) -> bool:
            if starting.is_set():
                starting.clear()
                until = time.monotonic() + 2 * THRESHOLD
                while time.monotonic() < until:  # bytecode: the GIL goes back and forth
                    pass
            return sees_every_step(watchdog, installation)

        monkeypatch.setattr(Watchdog, "_wait_sees_every_step", slow_first_look)

        def restart_then_parse() -> None:
            installation = _installation.current()
            assert installation is not None
            installation.watchdog.stop()
            starting.set()
            installation.watchdog.start()
            parse_body()

        _run_steps(loop_kind, [restart_then_parse])
        events.wait_for_blocks()
        (slow,) = events.slow_steps()
        blocked, slow = events.of_step(slow.started)
        assert blocked, f"no loop_blocked event ({slow})"
        line = _calling_line(parse_body, "json.loads(")
        assert blocked[0].location == line, blocked[0]
        assert blocked[0].blocked_for <= FIRST_REPORT_BOUND, blocked[0]
        assert blocked[0].thread == "loopscope-watchdog"


class TestOff:
    """Where the reader cannot work, blocks are reported as before: once the call returns."""

    @pytest.fixture(name="reader_off", params=["unknown layout", "no C accelerator"])
    def fixture_reader_off(
        self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[str]:
        """The reader off: as on an interpreter whose frame layout it does not know, or as
        without the C accelerator."""
        if request.param == "unknown layout":
            native = _gilreader._native()
            native._forget_layout(True)
            try:
                yield request.param
            finally:
                native._forget_layout(False)
        else:
            monkeypatch.setattr(_gilreader, "_reader", None)
            yield request.param

    def test_reported_after_the_call(
        self, loop_kind: str, reader_off: str, registry: CollectorRegistry
    ) -> None:
        """No thread is registered, so nothing is read without the GIL, and the block is
        reported once the call has returned: as old as the call (give or take the rounding
        and the clocks'), not a threshold younger, as with the reader.  The call is the
        sort, which runs no signal handler: the regular expression engine runs them, and a
        signal arriving during the call can give the watchdog the GIL in its middle."""
        events = Events()
        loopscope.install(
            registry=registry,
            slow_threshold=THRESHOLD,
            loop_blocked_after=THRESHOLD,
            events="off",
            instruments=(events,),
        )
        registered: list[int] = []
        took: list[float] = []

        def blocker() -> None:
            registered.append(_gilreader.registered())
            start = time.monotonic()
            result = sorted(_inputs()[2])  # kept: freeing it is no part of the call
            took.append(time.monotonic() - start)
            del result
            # The step goes on without the GIL for a moment: the watchdog, waiting for the
            # GIL since the call began, takes it while the step still runs (without this
            # it may get it only after the step, which then has no loop_blocked event).
            time.sleep(THRESHOLD / 2)

        try:
            _run_steps(loop_kind, [blocker])
        finally:
            loopscope.uninstall()
        assert registered == [0], reader_off
        (slow,) = events.slow_steps()
        blocked, _ = events.of_step(slow.started)
        assert blocked, "the block was not reported at all"
        assert any(event.blocked_for > took[0] - THRESHOLD / 2 for event in blocked), (
            blocked,
            took,
        )


class TestRegistration:
    """A loop thread is registered while its loop runs, and only then."""

    def test_while_running_and_until_uninstall(
        self, loop_kind: str, registry: CollectorRegistry
    ) -> None:
        """Registered while the loop runs; not after run_until_complete returns; and
        uninstall() ends the registration of a loop that is still running."""
        loopscope.install(registry=registry, slow_threshold=THRESHOLD)
        try:
            seen: list[int] = []
            loop = make_loop(loop_kind)

            async def look() -> None:
                seen.append(_gilreader.registered())

            loop.run_until_complete(look())
            seen.append(_gilreader.registered())
            running = threading.Event()
            stop = threading.Event()

            async def run_until_stopped() -> None:
                running.set()
                while not stop.is_set():
                    await asyncio.sleep(0.01)

            thread = threading.Thread(target=loop.run_until_complete, args=(run_until_stopped(),))
            thread.start()
            assert running.wait(10)
            seen.append(_gilreader.registered())
            loopscope.uninstall()
            seen.append(_gilreader.registered())
            stop.set()
            thread.join(10)
            loop.close()
        finally:
            loopscope.uninstall()
        assert seen == [1, 0, 1, 0]


#: The start of a script that collects its loop_blocked events in ``blocked`` (install
#: loopscope with ``instruments=(Events(),)``).
_BLOCKED_EVENTS = """import loopscope
from loopscope._instrument import Instrument
from tests.conftest import make_loop
blocked = []
class Events(Instrument):
    def loop_blocked(self, event):
        blocked.append(event)
"""


def _script(body: str) -> str:
    return textwrap.dedent(body)


def _run_script(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def test_endless_call_reported_on_stderr(loop_kind: str) -> None:
    """A call that would hold the GIL for hours is reported on stderr while it lasts (by
    the reader itself: nothing Python can run), naming the line that made it."""
    script = _script(
        f"""
        import re, sys
        import loopscope
        from tests.conftest import make_loop
        loopscope.install(slow_threshold=0.1, loop_blocked_after=0.2)
        async def endless():
            re.match(r"(a+)+$", "a" * 60 + "b")  # the endless call
        make_loop({loop_kind!r}).run_until_complete(endless())
        """
    )
    line = next(
        number for number, text in enumerate(script.splitlines(), 1) if "# the endless call" in text
    )
    report: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ) as process:
        timer = threading.Timer(60, process.kill)  # a generous bound for a busy machine
        timer.start()
        try:
            assert process.stderr is not None
            for text in process.stderr:
                if text.startswith("loopscope: loop 'MainThread' of process "):
                    report = [text]
                elif report:
                    report.append(text)
                    if f"<string>:{line} in endless" in text:
                        break
        finally:
            timer.cancel()
            process.kill()
    assert report, "no report on stderr"
    header = report[0]
    assert header.startswith(
        f"loopscope: loop 'MainThread' of process {process.pid} blocked for "
    ), header
    assert ", in a call that has held the GIL for " in header, header
    assert header.rstrip().endswith(f" s, at <string>:{line} in endless"), header
    assert any(f"<string>:{line} in endless" in text for text in report[2:])


@pytest.mark.parametrize("stderr_reports", [True, False])
def test_stderr_reports_option(loop_kind: str, stderr_reports: bool) -> None:
    """stderr_reports=False keeps the reader's own reports off stderr while such a call
    lasts; its loop_blocked events still come once the call returns."""
    subject = "a" + _inputs()[0]  # about twice BLOCK
    script = _BLOCKED_EVENTS + _script(
        f"""
        import re, time
        loopscope.install(slow_threshold=0.1, loop_blocked_after=0.1, events="logging",
                          stderr_reports={stderr_reports!r}, instruments=(Events(),))
        async def block():
            re.match(r"(a+)+$", {subject!r})  # blocks
        make_loop({loop_kind!r}).run_until_complete(block())
        deadline = time.monotonic() + 10  # reported once the call returned
        while not blocked and time.monotonic() < deadline:
            time.sleep(0.01)
        print(len(blocked))
        """
    )
    out = _run_script(script)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 1, out.stderr
    reports = [line for line in out.stderr.splitlines() if line.startswith("loopscope: loop ")]
    assert bool(reports) is stderr_reports, out.stderr
    # the events themselves go through logging, to stderr, either way
    assert "loop MainThread blocked " in out.stderr, out.stderr


def test_reader_never_reads_a_moving_stack_into_a_crash() -> None:
    """Stacks read again and again while the loop thread runs Python code (calls,
    generators, exec'd code, exceptions: frames made and freed all the time) never crash
    the process; what is read is a plausible stack or nothing."""
    script = _script(
        """
        import sys, threading, time
        from loopscope import _gilreader
        native = _gilreader._native()
        native.configure(0.0001, 3600.0, False, ())
        handle = native.register(object(), "stress")
        stop = threading.Event()
        def reads():
            # Armed and never disarmed: the reader reads every 0.1 ms or so, though the
            # thread below runs bytecode (the watchdog never arms it that way).
            while not stop.is_set():
                native.arm(0.0)
                time.sleep(0.0002)
        def recurse(n):
            return 0 if n == 0 else 1 + recurse(n - 1)
        def numbers():
            yield from range(50)
        def fail():
            raise ValueError
        reader = threading.Thread(target=reads)
        reader.start()
        deadline = time.monotonic() + 1.5
        seqs = set()
        bad = []
        while time.monotonic() < deadline:
            recurse(30)
            sum(numbers())
            exec("x = [i * i for i in range(20)]")
            try:
                fail()
            except ValueError:
                pass
            for seq, start, at, stack in native.captures(handle, 0):
                seqs.add(seq)
                bad += [e for e in stack if " in " not in e or ":" not in e]
        stop.set()
        reader.join()
        native.unregister(handle)
        print(len(seqs), max(seqs, default=0), len(bad))
        """
    )
    out = _run_script(script)
    assert out.returncode == 0, out.stderr
    _, last, bad = (int(word) for word in out.stdout.split())
    assert last >= 100, out.stdout  # it did read, many times
    assert bad == 0, out.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_after_fork(loop_kind: str) -> None:
    """A child made by os.fork() starts with no registration of the parent's, and its own
    loop's GIL-holding block is reported while it lasts, at the calling line."""
    script = _BLOCKED_EVENTS + _script(
        f"""
        import asyncio, os, re, sys, time
        from loopscope import _gilreader
        loopscope.install(slow_threshold=0.1, loop_blocked_after=0.1, events="off",
                          instruments=(Events(),))
        async def parent_side():
            pid = os.fork()
            if pid == 0:
                os._exit(_gilreader.registered())
            return os.waitpid(pid, 0)[1]
        print("registered in the child:", parent_side_status := make_loop(
            {loop_kind!r}).run_until_complete(parent_side()) >> 8)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            async def block():
                start = time.monotonic()
                re.match(r"(a+)+$", {_inputs()[0]!r})  # blocks
                return time.monotonic() - start
            took = make_loop({loop_kind!r}).run_until_complete(block())
            deadline = time.monotonic() + 10  # a block reported once its step ended
            while not blocked and time.monotonic() < deadline:
                time.sleep(0.01)
            first = blocked[0] if blocked else None
            print("first", first and first.location, first and first.blocked_for, took, sep="|")
            sys.stdout.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        """
    )
    out = _run_script(script)
    assert out.returncode == 0, out.stderr
    registered, first = out.stdout.splitlines()
    assert registered == "registered in the child: 0", out.stdout
    _, location, blocked_for, took = first.split("|")
    assert location.endswith("in block"), out.stdout
    assert float(blocked_for) <= FIRST_REPORT_BOUND, out.stdout
    assert float(blocked_for) <= float(took) - THRESHOLD, out.stdout
