"""Busy time: what it counts, on both twins, and how it is measured on asyncio's loop
without touching ``loop._selector`` (the poller inside the selector is timed instead)."""

from __future__ import annotations

import asyncio
import itertools
import select
import selectors
import socket
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any
from unittest import mock

import pytest
from prometheus_client import CollectorRegistry

import loopscope
from loopscope import _hotpath
from loopscope._stats import LoopStats

from .conftest import make_loop, sample
from .test_twin_behaviour import TWINS, twin_module

LABEL = {"loop": "busy"}
BUSY = "asyncio_loop_busy_seconds_total"
CALLBACK_SUM = "asyncio_loop_callback_duration_seconds_sum"

#: The known workload: IDLE seconds waiting in the selector, BLOCKS callbacks that each
#: hold the loop for BLOCK seconds.
IDLE, BLOCKS, BLOCK = 0.2, 4, 0.02
WORK = BLOCKS * BLOCK


@pytest.fixture(name="twin", params=TWINS)
def fixture_twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Each hot-path twin in turn, selected for the loops the test makes."""
    module = twin_module(str(request.param))
    if module is None:
        pytest.skip("loopscope._speedups cannot be imported: the C twin is not built")
    monkeypatch.setattr(_hotpath, "twin", module)
    return module


@pytest.fixture(name="registry")
def fixture_registry() -> Iterator[CollectorRegistry]:
    """loopscope installed on a fresh registry, loops labelled ``busy``."""
    registry = CollectorRegistry()
    loopscope.install(registry=registry, loop_name="busy", events="off")
    yield registry
    loopscope.uninstall()


async def _workload() -> None:
    """IDLE seconds of waiting in two sleeps, and BLOCKS blocking callbacks between them."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(IDLE / 2)
    done = loop.create_future()

    def block(left: int) -> None:
        time.sleep(BLOCK)
        if left > 1:
            loop.call_soon(block, left - 1)
        else:
            done.set_result(None)

    loop.call_soon(block, BLOCKS)
    await done
    await asyncio.sleep(IDLE / 2)


class TestBusyFigure:
    """Busy seconds are the time the loop ran, not the time it waited."""

    def test_known_workload(
        self, twin: ModuleType, loop_kind: str, registry: CollectorRegistry
    ) -> None:
        """0.2 s waiting and 0.08 s of blocking callbacks: busy is at least the 0.08 s and
        at most half of it above the callbacks' own measured sum, far below the wait.  On
        asyncio's loop the wait is timed in the selector's poller; the selector is the
        loop's own."""
        loop: Any = make_loop(loop_kind)
        selector = getattr(loop, "_selector", None)
        raw = getattr(selector, "_selector", None)
        seen: list[tuple[Any, Any]] = []

        async def main() -> None:
            if selector is not None:
                seen.append((loop._selector, loop._selector._selector))
            await _workload()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
        busy = sample(registry, BUSY, **LABEL)
        callbacks = sample(registry, CALLBACK_SUM, **LABEL)
        assert callbacks >= WORK
        assert WORK <= busy <= callbacks + WORK / 2, (busy, callbacks)
        if loop_kind == "asyncio":
            assert seen == [(selector, mock.ANY)]
            poller = seen[0][1]
            assert type(poller) is twin.TimedPoller and poller.poller is raw
            assert poller.waited >= IDLE / 2  # the wait ends a little early at times

    @pytest.mark.parametrize("kind", ["poll", "select"])
    def test_other_selectors(
        self, twin: ModuleType, registry: CollectorRegistry, kind: str
    ) -> None:
        """A PollSelector's poller is timed too; with a SelectSelector (no poller to time)
        busy time is the sum of the callbacks: either way the wait is not busy."""
        chosen = selectors.PollSelector() if kind == "poll" else selectors.SelectSelector()
        before = dict(vars(chosen))
        loop: Any = asyncio.SelectorEventLoop(chosen)

        async def main() -> None:
            assert loop._selector is chosen
            timed = type(chosen._selector) is twin.TimedPoller if kind == "poll" else False
            assert timed == (kind == "poll")
            await _workload()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
        busy = sample(registry, BUSY, **LABEL)
        assert WORK <= busy <= sample(registry, CALLBACK_SUM, **LABEL) + WORK / 2
        if kind == "select":
            assert vars(chosen).keys() == before.keys()


class TestSelectorUntouched:
    """What asyncio's loop keeps in ``_selector`` is its own, whatever a test puts there."""

    def test_mock_selector_before_run(self, registry: CollectorRegistry) -> None:
        """CPython's test_run_forever_pre_stopped: a Mock put in ``_selector`` is what the
        loop calls and what is found there afterwards; busy time is then the callbacks'."""
        loop: Any = asyncio.new_event_loop()
        own = loop._selector
        fake = loop._selector = mock.Mock()
        fake.select.return_value = ()
        try:
            loop.stop()
            loop.run_forever()
            assert loop._selector is fake
            fake.select.assert_called_once_with(0)
            assert type(own._selector) is not _hotpath.twin.TimedPoller
        finally:
            loop._selector = own
            loop.close()

    def test_selector_replaced_between_runs(self, registry: CollectorRegistry) -> None:
        """A selector put in ``_selector`` after a run is timed at the next run, and the
        one taken out gets its own poller back."""
        loop: Any = asyncio.new_event_loop()
        first = loop._selector
        first_raw = first._selector
        loop.run_until_complete(asyncio.sleep(0))
        assert type(first._selector) is _hotpath.twin.TimedPoller
        second = selectors.DefaultSelector()
        second_raw = second._selector  # type: ignore[attr-defined]
        for key in list(first.get_map().values()):
            second.register(key.fileobj, key.events, key.data)
            first.unregister(key.fileobj)
        loop._selector = second
        try:
            loop.run_until_complete(asyncio.sleep(0.01))
            assert loop._selector is second
            assert first._selector is first_raw
            assert type(second._selector) is _hotpath.twin.TimedPoller  # type: ignore[attr-defined]
            assert second._selector.poller is second_raw  # type: ignore[attr-defined]
        finally:
            loop.close()
            first.close()

    def test_uninstall_gives_the_poller_back(self, registry: CollectorRegistry) -> None:
        """After uninstall() the selector holds its own poller again and the loop runs."""
        loop: Any = asyncio.new_event_loop()
        raw = loop._selector._selector
        try:
            loop.run_until_complete(asyncio.sleep(0))
            assert loop._selector._selector is not raw
            loopscope.uninstall()
            assert loop._selector._selector is raw
            loop.run_until_complete(asyncio.sleep(0.01))
        finally:
            loop.close()


# --- TimedPoller itself, on each twin ------------------------------------------------------


class _Probe:
    """Just enough of a probe for a recorder; collects faults."""

    active = True

    def __init__(self) -> None:
        self.stats = LoopStats()
        self.faults: list[BaseException] = []

    def fault(self, exc: BaseException) -> None:
        self.faults.append(exc)


class _FakeKqueue:
    """A poller with kqueue's control(): records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def control(self, *args: Any) -> list[int]:
        self.calls.append(args)
        return [len(self.calls)]


class TestTimedPoller:
    """The poller stand-in forwards everything and times only the waits."""

    def test_forwards_and_times_poll(self, twin: ModuleType) -> None:
        """register, poll, modify, unregister and errors are the poller's; each poll()
        adds its duration (here one tick of a counting clock) to ``waited``."""
        ticks = itertools.count()
        recorder = twin.Recorder(_Probe(), lambda: float(next(ticks)), 1.0, False, ())
        raw = select.poll()
        poller = twin.TimedPoller(raw, recorder)
        here, there = socket.socketpair()
        try:
            poller.register(here.fileno(), select.POLLIN)
            assert poller.poll(0) == []
            there.send(b"x")
            assert poller.poll(1000) == [(here.fileno(), select.POLLIN)]
            poller.modify(here.fileno(), select.POLLOUT)
            assert poller.poll(0) == [(here.fileno(), select.POLLOUT)]
            with pytest.raises(TypeError, match="takes no keyword arguments"):
                poller.poll(timeout=0)  # the poller's own error, not counted as a wait
            poller.unregister(here.fileno())
            with pytest.raises(KeyError):
                poller.unregister(here.fileno())
            with pytest.raises(AttributeError, match=r"'select\.poll' object has no attribute"):
                poller.no_such_thing  # noqa: B018
            assert poller.waited == 3.0
            assert repr(poller) == repr(raw)
        finally:
            here.close()
            there.close()

    def test_control_times_the_wait_only(self, twin: ModuleType) -> None:
        """kqueue's control(None, n, timeout) is the wait; with a changelist it registers."""
        ticks = itertools.count()
        recorder = twin.Recorder(_Probe(), lambda: float(next(ticks)), 1.0, False, ())
        raw = _FakeKqueue()
        poller = twin.TimedPoller(raw, recorder)
        assert poller.control(["event"], 0, 0) == [1]
        assert poller.waited == 0.0
        assert poller.control(None, 8, 0.5) == [2]
        assert poller.waited == 1.0
        assert raw.calls == [(["event"], 0, 0), (None, 8, 0.5)]

    def test_lacks_what_its_poller_lacks(self, twin: ModuleType) -> None:
        """epoll has no control() and kqueue no poll(): their stand-ins have not either,
        with the poller's own error."""
        recorder = twin.Recorder(_Probe(), time.monotonic, 1.0, False, ())
        epoll = select.epoll()
        try:
            poller = twin.TimedPoller(epoll, recorder)
            assert hasattr(poller, "poll")
            assert not hasattr(poller, "control")
            with pytest.raises(AttributeError, match=r"'select\.epoll' object has no attribute"):
                getattr(poller, "con" + "trol")  # a name that is not interned, too
        finally:
            epoll.close()
        kqueue = twin.TimedPoller(_FakeKqueue(), recorder)
        assert hasattr(kqueue, "control")
        assert not hasattr(kqueue, "poll")

    def test_a_failing_clock_is_a_fault_not_an_error(self, twin: ModuleType) -> None:
        """A clock that raises is handed to the probe; the wait still happens and its
        result is the caller's."""
        probe = _Probe()

        def broken() -> float:
            raise RuntimeError("clock")

        poller = twin.TimedPoller(_FakeKqueue(), twin.Recorder(probe, broken, 1.0, False, ()))
        assert poller.control(None, 1, 0) == [1]
        assert [str(exc) for exc in probe.faults] == ["clock"]
        assert poller.waited == 0.0
