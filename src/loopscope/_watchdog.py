"""The watchdog: one thread per process that notices a loop stuck in one step, takes the
loop thread's stack while it is still stuck, and reports blocks that go on.

It wakes every quarter of the slow threshold and reads one attribute per loop
(``current_start``, written by the hooks around every step); only a step that has run for
half the threshold costs it more: one ``sys._current_frames()`` and the formatting of one
stack.  A step that ends up slow is then reported with that stack; a step still running
after ``loop_blocked_after`` seconds (1 s by default, never before the threshold), and at
twice, four times... that age after that, is reported as ``loop_blocked``, so a hang that
never ends is still seen.

A step that holds the GIL in one C call (``json.loads`` of a large body, a backtracking
regular expression) keeps the thread from ``sys._current_frames()`` until the call returns:
the GIL reader (``_gilreader``), armed whenever the thread is out of its wait, reads the
loop's stack meanwhile, and the thread reports the block from that copy once it has the
GIL back, with the age the block had when it was read.

The thread sleeps in the hot path's ``watch_steps``: the C twin's wakes up without the GIL
and reads the step markers in C, so the thread takes the GIL only when a step has run for
half the threshold, when a loop is added, or once a second: a Python thread waking 40
times a second, while a busy loop drops and retakes the GIL on every iteration, spent
about 8% of a CPU waiting for it.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from . import _gilreader, _hotpath
from ._describe import TASK_TYPES
from ._stacks import application_location, format_stack, library_rules

if TYPE_CHECKING:
    from ._options import Options
    from ._probe import LoopProbe

__all__ = ["WatchContext", "Watchdog"]


class WatchContext(Protocol):
    """What the watchdog needs from its installation (held weakly), and nothing more."""

    options: Options
    clock: Callable[[], float]

    def live_probes(self) -> list[LoopProbe]:
        """The probes of the loops instrumented now."""

    def report_fault(self, what: str, exc: BaseException) -> None:
        """Report a fault of loopscope's own, once."""


#: Reports of one ongoing block stop doubling at this interval (seconds).
MAX_REPORT_INTERVAL = 60.0
#: With the C wait, the list of loops is read again at least this often (seconds).
REFRESH_INTERVAL = 1.0
#: While stopping, the thread is woken again this often until it has gone (seconds).
STOP_POLL = 0.01
#: A capture of a step that ended before the watchdog could report it is left to the
#: step's own report (record_slow) for this long (seconds), then dropped.
HANDOVER_AGE = 2.0
#: Steps of one loop whose report schedules are kept: the running one's and those of
#: steps that ended before their hand-over was taken up.
KEPT_SCHEDULES = 4
#: How many of the latest captures the thread remembers having taken up: a hand-over is
#: taken up at the next check, and a check takes up a few captures per loop.
CONSIDERED = 256


class _Tally:
    """How many samples of one step saw each location, and the first stack of each."""

    __slots__ = ("counts", "stacks", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.counts: dict[str | None, int] = {}
        self.stacks: dict[str | None, list[str]] = {}

    def add(self, location: str | None, stack: list[str]) -> str | None:
        """Count a sample; the location seen most often so far (a known one before None,
        the earliest of equals)."""
        counts = self.counts
        counts[location] = counts.get(location, 0) + 1
        self.stacks.setdefault(location, stack)
        known = [where for where in counts if where is not None]
        if not known:
            return None
        return max(known, key=counts.__getitem__)


class Watchdog:
    """Watches every instrumented loop of one installation."""

    def __init__(self, installation: WatchContext) -> None:
        self.installation_ref = weakref.ref(installation)
        threshold = installation.options.slow_threshold
        self.threshold = threshold
        #: The first ``loop_blocked`` report of a step comes at this age (option
        #: ``loop_blocked_after``, never before the threshold).
        self.first_report = max(threshold, installation.options.loop_blocked_after)
        self.sample_after = threshold / 2
        self.interval = threshold / 4
        self.clock = installation.clock
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        # Per probe: the elapsed time of the next report of each step lately reported, by
        # the step's start (the running one's, and an ended one's handed over meanwhile).
        self.next_report: weakref.WeakKeyDictionary[LoopProbe, dict[float, float]] = (
            weakref.WeakKeyDictionary()
        )
        #: Per probe: the locations sampled in the step that runs now.
        self.tallies: weakref.WeakKeyDictionary[LoopProbe, _Tally] = weakref.WeakKeyDictionary()
        #: Blocks of steps that ended before the thread could report them (hand_over).
        self.handed: deque[tuple[LoopProbe, _gilreader.Capture, object, object]] = deque()
        #: The latest captures this thread took up while their step ran, or from a hand-over
        #: (``Capture.seq``): a capture handed over after the thread saw it is not reported
        #: twice.  Not the probe's ``gil_seen``: a later step's captures can move that past
        #: a hand-over this thread has not taken up yet (it read the loop's step marker after
        #: the step that handed it over had ended and the next had begun).
        self.considered: deque[int] = deque(maxlen=CONSIDERED)

    def start(self) -> None:
        """Start the thread (again, after a fork)."""
        self.stopped.clear()
        installation = self.installation_ref()
        if installation is not None:
            options = installation.options
            _gilreader.configure(
                self.first_report,
                options.stderr_reports and options.events != "off",
                library_rules(),
            )
        # The new thread wants the GIL until its first wait: a loop thread that starts a
        # call holding the GIL meanwhile is read all the same.
        _gilreader.arm(0.0)
        self.thread = threading.Thread(target=self._run, name="loopscope-watchdog", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        """Make the thread look at the loops again now (one was added, or stop)."""
        _hotpath.twin.wake_watchers()

    def hand_over(
        self, probe: LoopProbe, capture: _gilreader.Capture, callback: object, task: object
    ) -> None:
        """Report a block the GIL reader saw during a step of ``probe`` that has ended
        (with that step's callback and task): from any thread, and soon."""
        self.handed.append((probe, capture, callback, task))
        self.wake()

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self.stopped.set()
        thread, self.thread = self.thread, None
        if thread is None or thread is threading.current_thread():
            self.wake()
            return
        # A wake-up that comes while the thread is between two waits is not seen by the
        # next wait, so wake it until it has gone (at most 5 s).
        deadline = time.monotonic() + 5.0
        while True:
            self.wake()
            thread.join(timeout=STOP_POLL)
            if not thread.is_alive() or time.monotonic() >= deadline:
                return

    def alive(self) -> bool:
        """Whether the thread runs."""
        return self.thread is not None and self.thread.is_alive()

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                installation = self.installation_ref()
                if installation is None:
                    return
                steps_seen = self._wait_sees_every_step(installation)
                del installation  # not kept alive while the thread sleeps
                if not self._wait(steps_seen):
                    return
                installation = self.installation_ref()
                if installation is None:
                    return
                self.check(installation)
                del installation
        except BaseException as exc:
            installation = self.installation_ref()
            if installation is not None:
                installation.report_fault("watching for blocked loops (the watchdog)", exc)
        finally:
            _gilreader.disarm()

    def _wait(self, steps_seen: bool) -> bool:
        """Sleep until the next check: in the hot path's wait when it sees every loop's
        steps, else for one interval; False once stopped."""
        if not steps_seen:
            _gilreader.arm(self.interval)  # it wants the GIL back at the end of this wait
            return not self.stopped.wait(self.interval)
        _hotpath.twin.watch_steps(self.sample_after, self.interval, REFRESH_INTERVAL)
        return not self.stopped.is_set()

    def _wait_sees_every_step(self, installation: WatchContext) -> bool:
        """Whether the hot path's wait sees every loop's steps: each loop's recorder is one
        of that twin's, on the native clock (``watched``)."""
        if self.clock is not time.monotonic:
            return False
        recorder_type = _hotpath.twin.Recorder
        return all(
            type(recorder) is recorder_type and recorder.watched
            for recorder in (probe.recorder for probe in installation.live_probes())
        )

    def check(self, installation: WatchContext) -> None:
        """One round: sample the stack of every loop that has been in one step too long."""
        frames = None
        now = self.clock()
        while self.handed:
            probe, capture, callback, task = self.handed.popleft()
            if capture.seq not in self.considered:  # else reported while its step ran
                self.considered.append(capture.seq)
                probe.gil_seen = max(probe.gil_seen, capture.seq)
                self._report_capture(probe, capture, capture.step_start, callback, task)
        for probe in installation.live_probes():
            marks = probe.recorder  # where the hooks write the step markers
            start = marks.current_start
            if probe.gil_handle >= 0:
                self._report_captures(probe, start, marks.current_callback, now)
            if not start:
                continue
            elapsed = now - start
            if elapsed < self.sample_after:
                continue
            if frames is None:
                frames = sys._current_frames()
            frame = frames.get(probe.thread_id)
            callback = marks.current_callback
            if marks.current_start != start or frame is None:
                continue  # the step ended while we looked
            stack = format_stack(frame)
            location = application_location(stack)
            sample = probe.sample
            if sample is None or sample[0] != start:
                probe.note_span(start, callback)
            self._note_sample(probe, start, stack, location)
            self._maybe_report(probe, start, elapsed, callback, stack, location)

    def _report_captures(
        self, probe: LoopProbe, start: float, callback: object, now: float
    ) -> None:
        """Report the blocks the GIL reader saw in the step running now while the thread
        waited for the GIL.  (Those of steps that ended meanwhile are handed over by the
        steps' own reports.)"""
        for capture in _gilreader.captures(probe.gil_handle, probe.gil_seen):
            running = bool(start) and (
                capture.step_start == start
                or (not capture.step_start and capture.captured_at >= start)
            )
            if running:
                probe.gil_seen = capture.seq
                self.considered.append(capture.seq)
                stack = capture.stack
                # A sample is taken at half the threshold, as sys._current_frames() would.
                if capture.captured_at - start >= self.sample_after:
                    self._note_sample(probe, start, stack, application_location(stack))
                self._report_capture(probe, capture, start, callback, None)
            elif now - capture.captured_at > HANDOVER_AGE:
                probe.gil_seen = capture.seq  # its step ended long ago: record_slow had it

    def _note_sample(
        self, probe: LoopProbe, start: float, stack: list[str], location: str | None
    ) -> None:
        """Count one sample of the step that started at ``start``: the step's sample (what
        its slow_callback report will name) is the location seen most often while it ran,
        the earliest of equals, with the first stack taken there."""
        tally = self.tallies.get(probe)
        if tally is None or tally.start != start:
            tally = self.tallies[probe] = _Tally(start)
        best = tally.add(location, stack)
        probe.sample = (start, tally.stacks[best], best)

    def _report_capture(
        self,
        probe: LoopProbe,
        capture: _gilreader.Capture,
        start: float,
        callback: object,
        task: object,
    ) -> None:
        if not start:
            return
        stack = capture.stack
        self._maybe_report(
            probe,
            start,
            capture.captured_at - start,
            callback,
            stack,
            application_location(stack),
            task,
        )

    def _maybe_report(
        self,
        probe: LoopProbe,
        start: float,
        elapsed: float,
        callback: object,
        stack: list[str],
        location: str | None,
        task: object = None,
    ) -> None:
        schedules = self.next_report.get(probe)
        if schedules is None:
            schedules = self.next_report[probe] = {}
        due = schedules.get(start, self.first_report)
        if elapsed < due:
            return
        # The next report at the next age of the schedule (first_report, twice that, ...,
        # at most a minute apart) past this one: a report that came late (a block read by
        # the GIL reader, reported once the GIL came back) does not bring the next one on.
        while due <= elapsed:
            due = min(due * 2, due + MAX_REPORT_INTERVAL)
        schedules[start] = due
        if len(schedules) > KEPT_SCHEDULES:
            del schedules[min(schedules)]  # the earliest step's: it has long ended
        if task is None:
            owner = getattr(callback, "__self__", None)
            task = owner if isinstance(owner, TASK_TYPES) else None
        probe.events.loop_blocked(
            probe.label,
            elapsed,
            self.threshold,
            callback,
            task,
            started=start,
            blocking_stack=stack,
            location=location,
        )
