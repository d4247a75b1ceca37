"""Where the loop is blocked: stacks taken while it is blocked, for every kind of step."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import loopscope

from .conftest import make_loop, sample

Run = Callable[[Callable[[], Awaitable[Any]]], Any]
THRESHOLD = 0.05
BLOCK = 0.2
# The reported duration is the step's own, read around it: it may only exceed the injected
# block by the step's other work and by scheduling noise on a shared machine.
TOLERANCE = 0.03


def blocking_sleep() -> None:
    """Blocks by sleeping."""
    time.sleep(BLOCK)


def blocking_cpu() -> None:
    """Blocks by computing."""
    deadline = time.perf_counter() + BLOCK
    while time.perf_counter() < deadline:
        pass


BLOCKERS = {"sleep": blocking_sleep, "cpu": blocking_cpu}


@pytest.fixture(autouse=True)
def _install(registry: CollectorRegistry) -> None:
    loopscope.install(registry=registry, slow_threshold=THRESHOLD, loop_blocked_after=THRESHOLD)


@pytest.fixture(name="events")
def fixture_events() -> Iterator[list[dict[str, Any]]]:
    """The structlog events logged during the test."""
    with capture_logs() as logs:
        yield logs


def _slow(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "slow_callback"]


def _check_report(event: dict[str, Any], blocker: str) -> None:
    name = BLOCKERS[blocker].__name__
    assert any(entry.endswith(f" in {name}") for entry in event["blocking_stack"]), event
    assert event["location"] is not None and event["location"].endswith(f" in {name}")
    assert "test_blocking.py" in event["location"]
    assert BLOCK <= event["duration"] < BLOCK + TOLERANCE


async def _in_task(blocker: Callable[[], None]) -> None:
    async def handler() -> None:
        blocker()

    await asyncio.create_task(handler())


async def _in_callback(blocker: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(lambda: (blocker(), done.set_result(None)))
    await done


async def _in_timer(blocker: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_later(0.005, lambda: (blocker(), done.set_result(None)))
    await done


async def _in_threadsafe(blocker: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    thread = threading.Thread(
        target=loop.call_soon_threadsafe, args=(lambda: (blocker(), done.set_result(None)),)
    )
    thread.start()
    await done
    thread.join()


async def _in_data_received(blocker: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    accepted: list[asyncio.BaseTransport] = []

    class Receiver(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)

        def data_received(self, data: bytes) -> None:
            blocker()
            if not done.done():
                done.set_result(data)

    server = await loop.create_server(Receiver, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    transport.write(b"ping")
    await done
    transport.close()
    for peer in accepted:
        peer.close()
    server.close()
    await server.wait_closed()


async def _in_add_reader(blocker: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    reader, writer = socket.socketpair()
    reader.setblocking(False)

    def on_readable() -> None:
        reader.recv(16)
        loop.remove_reader(reader.fileno())
        blocker()
        done.set_result(None)

    loop.add_reader(reader.fileno(), on_readable)
    writer.send(b"x")
    try:
        await done
    finally:
        reader.close()
        writer.close()


PLACES = {
    "task_step": _in_task,
    "callback": _in_callback,
    "timer": _in_timer,
    "threadsafe": _in_threadsafe,
    "data_received": _in_data_received,
    "add_reader": _in_add_reader,
}


class TestEveryKindOfStep:
    """A block is reported with its stack and duration wherever it happens."""

    @pytest.mark.parametrize("blocker", sorted(BLOCKERS))
    @pytest.mark.parametrize("place", list(PLACES))
    def test_block_is_attributed(
        self,
        run: Run,
        registry: CollectorRegistry,
        events: list[dict[str, Any]],
        place: str,
        blocker: str,
    ) -> None:
        """The slow_callback event names the blocking function, with its duration."""
        run(lambda: PLACES[place](BLOCKERS[blocker]))
        slow = _slow(events)
        assert len(slow) == 1, events
        _check_report(slow[0], blocker)
        location = slow[0]["location"]
        assert (
            sample(
                registry,
                "asyncio_loop_slow_callbacks_by_location_total",
                loop="MainThread",
                location=location,
            )
            == 1
        )


class TestNoFalsePositives:
    """Idle and merely busy loops are not blocked loops."""

    def test_idle_loop(self, run: Run, events: list[dict[str, Any]]) -> None:
        """A loop waiting in select/epoll for 2 s reports nothing."""
        run(lambda: asyncio.sleep(2.0))
        assert events == []

    def test_saturated_loop(self, run: Run, events: list[dict[str, Any]]) -> None:
        """Many short callbacks over 0.5 s are no block."""
        # A threshold well above any preemption a shared machine may inflict on one step.
        loopscope.uninstall()
        registry = CollectorRegistry()
        loopscope.install(registry=registry, slow_threshold=0.25)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            deadline = time.monotonic() + 0.5
            done = loop.create_future()

            def short() -> None:
                if time.monotonic() < deadline:
                    for _ in range(5):
                        loop.call_soon(tiny)
                    loop.call_soon(short)
                else:
                    done.set_result(None)

            def tiny() -> None:
                sum(range(50))

            loop.call_soon(short)
            await done

        run(main)
        assert events == []
        assert sample(registry, "asyncio_loop_slow_callbacks_total", loop="MainThread") == 0
        assert sample(registry, "asyncio_loop_busy_seconds_total", loop="MainThread") > 0.3


class TestStepEndedByBaseException:
    """A step that raises KeyboardInterrupt or SystemExit is over: the loop is not blocked."""

    @pytest.mark.parametrize("exception", [KeyboardInterrupt, SystemExit])
    def test_idle_loop_after_interrupt(
        self, loop_kind: str, exception: type[BaseException], events: list[dict[str, Any]]
    ) -> None:
        """After a callback raised out of run_until_complete, an idle process and an idle
        loop produce no loop_blocked or slow_callback event."""
        loop = make_loop(loop_kind)

        def interrupt() -> None:
            raise exception

        async def main() -> None:
            loop.call_soon(interrupt)
            await asyncio.sleep(0.05)

        try:
            with pytest.raises(exception):
                loop.run_until_complete(main())
            time.sleep(6 * THRESHOLD)  # the watchdog looks several times meanwhile
            loop.run_until_complete(asyncio.sleep(6 * THRESHOLD))
        finally:
            loop.close()
        assert [e["event"] for e in events] == []


class TestLongBlocks:
    """A hang is reported while it goes on."""

    def test_loop_blocked_before_end(self, run: Run, events: list[dict[str, Any]]) -> None:
        """A 0.5 s hang (10 thresholds) yields loop_blocked events before slow_callback."""

        def hang() -> None:
            time.sleep(0.5)

        async def main() -> None:
            hang()

        run(main)
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "slow_callback"
        blocked = [e for e in events if e["event"] == "loop_blocked"]
        assert 2 <= len(blocked) <= 5  # at 1, 2, 4 and 8 thresholds
        assert all(e["location"].endswith(" in hang") for e in blocked)
        assert blocked[0]["blocked_for"] < blocked[-1]["blocked_for"] < 0.5
        assert blocked[0]["task"]

    def test_slow_step_named_where_it_spent_its_time(
        self, run: Run, registry: CollectorRegistry, events: list[dict[str, Any]]
    ) -> None:
        """A step that blocks briefly in one place and for long in another is counted under
        the second: the location sampled most often, not the first sampled."""

        def briefly() -> None:
            time.sleep(0.1)

        def for_long() -> None:
            time.sleep(0.5)

        async def main() -> None:
            briefly()
            for_long()

        run(main)
        slow = _slow(events)
        assert len(slow) == 1, events
        assert slow[0]["location"].endswith(" in for_long"), slow[0]
        assert any(entry.endswith(" in for_long") for entry in slow[0]["blocking_stack"])
        location = slow[0]["location"]
        assert (
            sample(
                registry,
                "asyncio_loop_slow_callbacks_by_location_total",
                loop="MainThread",
                location=location,
            )
            == 1
        )


class TestThreads:
    """Loops in other threads are watched under their own names."""

    def test_two_loops_in_two_threads(self, loop_kind: str) -> None:
        """Each thread's block is reported under that thread's loop label."""

        def block_a() -> None:
            time.sleep(BLOCK)

        def block_b() -> None:
            time.sleep(BLOCK)

        def worker(blocker: Callable[[], None]) -> None:
            async def main() -> None:
                await asyncio.sleep(0.01)
                blocker()

            loop = make_loop(loop_kind)
            loop.run_until_complete(main())
            loop.close()

        with capture_logs() as logs:
            threads = [
                threading.Thread(target=worker, args=(block_a,), name="loop-a"),
                threading.Thread(target=worker, args=(block_b,), name="loop-b"),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
        slow = {e["loop"]: e for e in _slow(logs)}
        assert set(slow) == {"loop-a", "loop-b"}
        assert slow["loop-a"]["location"].endswith(" in block_a")
        assert slow["loop-b"]["location"].endswith(" in block_b")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_watchdog_after_fork(loop_kind: str) -> None:
    """A child made by os.fork() after install() has a working watchdog."""
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys, time
        import loopscope
        from structlog.testing import capture_logs
        from tests.conftest import make_loop
        loopscope.install(slow_threshold=0.05, loop_blocked_after=0.05)
        pid = os.fork()
        if pid == 0:
            def blocked_in_child():
                time.sleep(0.3)
            async def main():
                blocked_in_child()
            with capture_logs() as logs:
                loop = make_loop({loop_kind!r})
                loop.run_until_complete(main())
                loop.close()
            ok = any(e["event"] == "loop_blocked" and e["location"].endswith("blocked_in_child")
                     for e in logs)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
