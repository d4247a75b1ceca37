"""On uvloop, a task step that waited in the ready queue behind another step starts where
that step ended, without a clock read of its own; never across anything that breaks the
chain (the loop stopping and starting again, another kind of callback, a heartbeat); and
a step's schedule delay still counts from when it was made ready.

On asyncio's loop every step reads the clock: the same tests check that no step starts
before the one ahead of it ended, and that each waits as long as it did.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import loopscope
from loopscope._instrument import Instrument, SlowStep

from .conftest import loop_label, make_loop, sample

THRESHOLD = 0.05
#: A block where a test compares times: far longer than a pause a loaded machine can put
#: between two callbacks or into a step (the process descheduled, a garbage collection),
#: which a block of 100 ms was not, and inside one bucket of the histogram, (0.25, 0.5].
BLOCK = 0.3


def _run(loop_kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = make_loop(loop_kind)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class SlowSteps(Instrument):
    def __init__(self) -> None:
        self.steps: list[SlowStep] = []

    def slow_step(self, event: SlowStep) -> None:
        self.steps.append(event)

    def of(self, coro_name: str) -> list[SlowStep]:
        return [s for s in self.steps if s.coro is not None and s.coro.endswith(coro_name)]


@pytest.fixture(name="slow")
def fixture_slow(registry: CollectorRegistry) -> Iterator[SlowSteps]:
    slow = SlowSteps()
    loopscope.install(
        registry=registry,
        slow_threshold=THRESHOLD,
        loop_blocked_after=10.0,
        lag_interval=60.0,  # no heartbeat between the steps here
        events="off",
        instruments=(slow,),
    )
    yield slow
    loopscope.uninstall()


def test_a_waiting_step_starts_where_the_one_ahead_ended(loop_kind: str, slow: SlowSteps) -> None:
    """Two tasks made ready together: the second's first step waits for the first's, which
    blocks, and starts when it ended (on uvloop, exactly then: no clock read of its own);
    its duration is its own block only."""

    async def first() -> None:
        time.sleep(BLOCK)

    async def second() -> None:
        time.sleep(BLOCK)

    async def main() -> None:
        await asyncio.gather(first(), second())

    _run(loop_kind, main)
    (one,) = slow.of("first")
    (two,) = slow.of("second")
    # An event's duration is rounded to the microsecond.
    assert two.started >= one.started + one.duration - 1e-6, (one, two)
    assert two.duration < 1.5 * BLOCK, two  # with the first's block, it would be 2 x BLOCK


def test_clock_reads_per_task_step(loop_kind: str, registry: CollectorRegistry) -> None:
    """On uvloop most task steps of a storm of tasks take their start from the step before
    them: the clock is read about twice per step (when the step is made ready and when it
    ends), against three times on asyncio's loop (there, also when it starts)."""
    from loopscope import _installation

    reads = [0]

    def clock() -> float:
        reads[0] += 1
        return time.monotonic()

    loopscope.install(registry=registry, lag_interval=60.0)
    try:
        installation = _installation.current()
        assert installation is not None
        installation.clock = clock  # read by the probe of every loop made from now on

        async def worker() -> None:
            for _ in range(20):
                await asyncio.sleep(0)

        async def storm() -> None:
            await asyncio.gather(*(worker() for _ in range(10)))

        loop = make_loop(loop_kind)
        try:
            loop.run_until_complete(storm())  # the first steps of each kind
            before = reads[0]
            loop.run_until_complete(storm())
            per_step = (reads[0] - before) / (10 * 21)
        finally:
            loop.close()
    finally:
        loopscope.uninstall()
    if loop_kind == "uvloop":
        assert 2.0 <= per_step < 2.5, per_step
    else:
        assert per_step >= 3.0, per_step


def test_never_across_a_stop(loop_kind: str, slow: SlowSteps) -> None:
    """A task step made ready before the loop stopped starts, when the loop runs again, on
    a clock read of its own: the time the loop was stopped is not part of the step."""
    loop = make_loop(loop_kind)
    tasks: list[asyncio.Task[None]] = []

    async def later() -> None:
        pass

    def create_later() -> None:
        tasks.append(loop.create_task(later()))

    def stop() -> None:
        # uvloop stops the loop once the handles queued before its stop have run, asyncio's
        # loop at the end of this round: either way create_later's task, or create_later
        # itself, waits for the next run.
        loop.stop()
        loop.call_soon(create_later)

    async def start() -> None:
        time.sleep(2 * THRESHOLD)  # a slow step, just before the loop stops
        asyncio.get_running_loop().call_soon(stop)

    try:
        loop.create_task(start())
        loop.run_forever()
        if loop_kind == "uvloop":
            (task,) = tasks
            assert not task.done()  # its first step was made ready, and waits
        time.sleep(4 * THRESHOLD)  # the loop is stopped: no step runs
        loop.run_until_complete(asyncio.sleep(0))
        assert tasks and tasks[0].done()
    finally:
        loop.close()
    (blocked,) = slow.of("start")
    assert blocked.duration < 4 * THRESHOLD, blocked
    assert slow.of("later") == [], slow.steps


def test_never_across_a_heartbeat(
    loop_kind: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """loopscope's heartbeat is not measured: a heartbeat that runs between two steps (made
    slow here) is not charged to the step after it."""
    from loopscope._asyncio_hooks import AsyncioProbe
    from loopscope._uvloop_hooks import UvloopProbe

    beats: list[float] = []

    def slow_beat(probe: object) -> None:
        if not beats:
            beats.append(time.monotonic())
            time.sleep(2 * THRESHOLD)

    for probe_class in (AsyncioProbe, UvloopProbe):
        monkeypatch.setattr(probe_class, "on_beat", slow_beat)
    slow = SlowSteps()
    loopscope.install(
        registry=registry,
        slow_threshold=THRESHOLD,
        loop_blocked_after=10.0,
        lag_interval=THRESHOLD / 10,
        events="off",
        instruments=(slow,),
    )
    try:

        async def stepper() -> None:
            # Each step blocks for longer than the heartbeat interval (and for a fifth of
            # the threshold), so the heartbeat is due whenever a step ends; the next step
            # is already in the ready queue.
            for _ in range(10):
                time.sleep(THRESHOLD / 5)
                await asyncio.sleep(0)

        _run(loop_kind, stepper)
    finally:
        loopscope.uninstall()
    assert beats, "no heartbeat ran"
    assert slow.of("stepper") == [], slow.steps


def test_never_across_an_io_callback(loop_kind: str, slow: SlowSteps) -> None:
    """A reader callback that runs between a task step and the task's next one (uvloop
    polls for I/O between two rounds of its ready queue) is measured as itself, and the
    next step is not charged for it."""
    reader, writer = socket.socketpair()
    loop = make_loop(loop_kind)
    try:

        def readable() -> None:
            loop.remove_reader(reader)
            reader.recv(16)
            time.sleep(2 * THRESHOLD)

        async def stepper() -> None:
            loop.add_reader(reader, readable)
            await asyncio.sleep(0)
            writer.send(b"x")  # readable from the next poll, before this task's next step
            await asyncio.sleep(0)
            await asyncio.sleep(0.01)  # the reader callback has run by now

        loop.run_until_complete(stepper())
    finally:
        loop.close()
        reader.close()
        writer.close()
    (step,) = slow.steps
    assert step.location is not None and step.location.endswith(" in readable"), step


def test_never_past_a_slow_steps_report(loop_kind: str, registry: CollectorRegistry) -> None:
    """A slow step's report runs after its end was read (here an instrument that takes its
    time, as a logging handler sending the report may): the step after it is not charged
    for the report."""

    class SlowToReport(SlowSteps):
        def slow_step(self, event: SlowStep) -> None:
            super().slow_step(event)
            if len(self.steps) == 1:
                time.sleep(2 * THRESHOLD)

    slow = SlowToReport()
    loopscope.install(
        registry=registry,
        slow_threshold=THRESHOLD,
        loop_blocked_after=10.0,
        lag_interval=60.0,
        events="off",
        instruments=(slow,),
    )
    try:

        async def first() -> None:
            time.sleep(2 * THRESHOLD)

        async def second() -> None:
            pass

        async def main() -> None:
            await asyncio.gather(first(), second())

        _run(loop_kind, main)
    finally:
        loopscope.uninstall()
    assert len(slow.of("first")) == 1, slow.steps
    assert slow.of("second") == [], slow.steps


DELAY = "asyncio_loop_schedule_delay_seconds"


def _waited_through_one_block(
    loop_kind: str, registry: CollectorRegistry, main: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Run main, whose one block of BLOCK seconds holds up exactly one callback: check that
    one callback waited as long as the block (0.25 to 0.5 s: not from before the block,
    which would be more, nor from its end), none other 0.25 s or more, and that the waits
    add up to the block at least."""
    _run(loop_kind, main)
    labels = loop_label()

    def waited_over(bound: str) -> float:
        under = sample(registry, f"{DELAY}_bucket", **labels, le=bound)
        return sample(registry, f"{DELAY}_count", **labels) - under

    assert (waited_over("0.25"), waited_over("0.5")) == (1, 0)
    assert sample(registry, f"{DELAY}_sum", **labels) >= BLOCK


@pytest.fixture(name="measured")
def fixture_measured(registry: CollectorRegistry) -> Iterator[CollectorRegistry]:
    loopscope.install(registry=registry, lag_interval=60.0, slow_threshold=10.0)
    yield registry
    loopscope.uninstall()


def test_a_next_step_waits_from_the_end_of_the_step_before_it(
    loop_kind: str, measured: CollectorRegistry
) -> None:
    """A task's next step, made ready as its step ends, waits behind another task's step
    that blocks: it starts where that step ended, having waited as long as the block."""

    async def yields() -> None:
        await asyncio.sleep(0)  # the next step is queued behind blocks()'s step

    async def blocks() -> None:
        time.sleep(BLOCK)

    async def main() -> None:
        await asyncio.gather(yields(), blocks())

    _waited_through_one_block(loop_kind, measured, main)


def test_a_new_tasks_first_step_waits_from_its_creation(
    loop_kind: str, measured: CollectorRegistry
) -> None:
    """A task created in the middle of another task's step that then blocks: its first step
    was made ready when it was created, not when the step that created it ended."""

    async def child() -> None:
        pass

    async def main() -> None:
        await asyncio.sleep(0)  # a step of a task seen: loopscope knows a step's type
        task = asyncio.get_running_loop().create_task(child())
        time.sleep(BLOCK)
        await task

    _waited_through_one_block(loop_kind, measured, main)


def test_a_woken_task_waits_from_its_wakeup(loop_kind: str, measured: CollectorRegistry) -> None:
    """A task woken in the middle of another task's step that then blocks (a future's
    result set) waits from when it was woken."""

    async def waiter(future: asyncio.Future[None]) -> None:
        await future

    async def main() -> None:
        future = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(waiter(future))
        await asyncio.sleep(0)  # waiter() now waits for the future
        future.set_result(None)
        time.sleep(BLOCK)
        await task

    _waited_through_one_block(loop_kind, measured, main)
