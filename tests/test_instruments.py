"""The instrument API (``loopscope.Instrument``) and the built-in outputs that use it: the
events an instrument receives, what happens to one that raises, the routes of the log
output (standard logging, structlog, off) and the defaults that keep a production log
readable.  On both loops; CI runs the file on both hot paths."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import loopscope
from loopscope import _hotpath
from loopscope._instrument import overridden_hooks

from .conftest import make_loop

HERE = Path(__file__).resolve()


class Recorder(loopscope.Instrument):
    """Keeps every event it is given, with the thread that delivered it."""

    def __init__(self) -> None:
        self.slow: list[loopscope.SlowStep] = []
        self.blocked: list[loopscope.LoopBlocked] = []
        self.threads: list[str] = []
        self._lock = threading.Lock()

    def slow_step(self, event: loopscope.SlowStep) -> None:
        with self._lock:
            self.slow.append(event)
            self.threads.append(threading.current_thread().name)

    def loop_blocked(self, event: loopscope.LoopBlocked) -> None:
        with self._lock:
            self.blocked.append(event)
            self.threads.append(threading.current_thread().name)


@pytest.fixture(autouse=True)
def _structlog_unconfigured() -> Iterator[None]:
    """Each test starts as an application that never configured structlog."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def blocking_call(seconds: float) -> None:
    time.sleep(seconds)


def run_blocking_task(loop_kind: str, *seconds: float) -> None:
    """Run, on a new loop, one task per entry of ``seconds`` that blocks that long."""
    loop = make_loop(loop_kind)

    async def main(duration: float) -> None:
        await asyncio.sleep(0.005)
        blocking_call(duration)

    async def all_of_them() -> None:
        for duration in seconds:
            await asyncio.create_task(main(duration))

    try:
        loop.run_until_complete(all_of_them())
    finally:
        loop.close()


def run_blocking_callback(loop_kind: str, seconds: float) -> None:
    loop = make_loop(loop_kind)
    try:
        loop.call_soon(blocking_call, seconds)
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.close()


def blocking_line() -> int:
    """The line of ``time.sleep`` in :func:`blocking_call`."""
    return blocking_call.__code__.co_firstlineno + 1


class TestEvents:
    def test_a_task_step(self, loop_kind: str, registry: CollectorRegistry) -> None:
        recorder = Recorder()
        loopscope.install(
            registry=registry, slow_threshold=0.05, loop_blocked_after=0.1, events="off",
            instruments=[recorder],
        )  # fmt: skip
        run_blocking_task(loop_kind, 0.35)
        assert len(recorder.slow) == 1, recorder.slow
        slow = recorder.slow[0]
        assert isinstance(slow, loopscope.SlowStep) and slow.name == "slow_callback"
        assert slow.loop == "MainThread" and slow.kind == "task"
        assert slow.task is not None and slow.task.startswith("Task-")
        assert slow.coro is not None and slow.coro.endswith("main"), slow.coro
        assert slow.callback is None
        assert slow.duration >= 0.35 and slow.threshold == 0.05
        assert slow.location == f"{HERE.name}:{blocking_line()} in blocking_call" or (
            slow.location is not None
            and slow.location.endswith(f"{HERE.name}:{blocking_line()} in blocking_call")
        ), slow.location
        assert isinstance(slow.blocking_stack, tuple)
        assert slow.blocking_stack[-1] == f"{HERE}:{blocking_line()} in blocking_call"
        assert slow.importing is False
        assert slow.thread == "MainThread"
        assert abs(slow.timestamp - time.time()) < 60
        # Still blocked at 0.1 s and at 0.2 s (then due at 0.4 s): two reports from the
        # watchdog's thread, about the same step.
        assert len(recorder.blocked) == 2, recorder.blocked
        assert recorder.blocked[0].blocked_for >= 0.1 and recorder.blocked[1].blocked_for >= 0.2
        for blocked in recorder.blocked:
            assert isinstance(blocked, loopscope.LoopBlocked) and blocked.name == "loop_blocked"
            assert blocked.started == slow.started
            assert blocked.thread == "loopscope-watchdog"
            assert blocked.task == slow.task and blocked.location == slow.location
        assert sorted(set(recorder.threads)) == ["MainThread", "loopscope-watchdog"]
        with pytest.raises(dataclasses.FrozenInstanceError):
            slow.duration = 0.0  # type: ignore[misc]
        assert slow.fields()["blocking_stack"] == list(slow.blocking_stack)

    def test_a_callback(self, loop_kind: str, registry: CollectorRegistry) -> None:
        recorder = Recorder()
        loopscope.install(
            registry=registry, slow_threshold=0.05, events="off", instruments=[recorder]
        )
        run_blocking_callback(loop_kind, 0.25)
        assert len(recorder.slow) == 1, recorder.slow
        slow = recorder.slow[0]
        assert slow.kind == "callback" and slow.task is None and slow.coro is None
        assert slow.callback is not None and "blocking_call" in slow.callback
        assert slow.location is not None and slow.location.endswith("in blocking_call")
        assert recorder.blocked == []  # 0.15 s is well under loop_blocked_after's 1 s

    def test_only_overridden_hooks(self, registry: CollectorRegistry) -> None:
        class OnlySlow(loopscope.Instrument):
            def slow_step(self, event: loopscope.SlowStep) -> None:
                pass

        assert overridden_hooks(loopscope.Instrument()) == ()
        assert overridden_hooks(OnlySlow()) == ("slow_step",)
        assert overridden_hooks(Recorder()) == ("slow_step", "loop_blocked")
        installation = loopscope.install(registry=registry, events="off", instruments=[OnlySlow()])
        assert installation.events.wants("slow_step")
        assert not installation.events.wants("loop_blocked")


class TestFaultyInstrument:
    def test_raising_instrument_is_removed(
        self, loop_kind: str, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        calls: list[str] = []

        class Faulty(loopscope.Instrument):
            def slow_step(self, event: loopscope.SlowStep) -> None:
                calls.append(event.name)
                raise RuntimeError("the instrument's own bug")

        faulty, recorder = Faulty(), Recorder()
        installation = loopscope.install(
            registry=registry, slow_threshold=0.05, events="off", instruments=[faulty, recorder]
        )
        with caplog.at_level(logging.ERROR, logger="loopscope"):
            run_blocking_task(loop_kind, 0.08, 0.08)  # completes: nothing reached the app
        assert calls == ["slow_callback"]
        assert len(recorder.slow) == 2  # the others go on receiving events
        assert faulty not in installation.instruments and recorder in installation.instruments
        errors = [r for r in caplog.records if r.name == "loopscope" and r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert "raised in slow_step() and was removed" in errors[0].getMessage()
        assert errors[0].exc_info is not None and "own bug" in str(errors[0].exc_info[1])
        with pytest.raises(ValueError, match="not an instrument of this installation"):
            installation.remove_instrument(faulty)

    def test_raising_in_the_watchdog(
        self, loop_kind: str, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        class Faulty(loopscope.Instrument):
            def loop_blocked(self, event: loopscope.LoopBlocked) -> None:
                raise KeyError("boom")

        recorder = Recorder()
        loopscope.install(
            registry=registry, slow_threshold=0.05, loop_blocked_after=0.05, events="off",
            instruments=[Faulty(), recorder],
        )  # fmt: skip
        with caplog.at_level(logging.ERROR, logger="loopscope"):
            run_blocking_task(loop_kind, 0.3)
        assert len(recorder.blocked) >= 2 and len(recorder.slow) == 1
        errors = [r for r in caplog.records if "raised in loop_blocked()" in r.getMessage()]
        assert len(errors) == 1


class TestManagingInstruments:
    def test_add_and_remove(self, loop_kind: str, registry: CollectorRegistry) -> None:
        first, second = Recorder(), Recorder()
        installation = loopscope.install(
            registry=registry, slow_threshold=0.05, events="off", instruments=[first]
        )
        installation.add_instrument(second)
        installation.add_instrument(second)  # once only
        assert installation.instruments == (first, second)
        run_blocking_task(loop_kind, 0.08)
        installation.remove_instrument(first)
        run_blocking_task(loop_kind, 0.08)
        assert (len(first.slow), len(second.slow)) == (1, 2)

    def test_a_later_install_adds_its_instruments(self, registry: CollectorRegistry) -> None:
        first, second = Recorder(), Recorder()
        installation = loopscope.install(registry=registry, instruments=[first])
        assert loopscope.install(instruments=[second]) is installation
        assert installation.instruments[-2:] == (first, second)
        third = Recorder()  # added even along with options that conflict (which stay)
        assert loopscope.install(slow_threshold=0.5, instruments=[third]) is installation
        assert installation.instruments[-3:] == (first, second, third)
        assert installation.options.slow_threshold == 0.1
        assert repr(installation.instruments[0]).startswith("<loopscope's event log")

    def test_bad_instruments(self, registry: CollectorRegistry) -> None:
        installation = loopscope.install(registry=registry)
        with pytest.raises(TypeError, match=r"loopscope\.Instrument"):
            installation.add_instrument(object())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="not an instrument"):
            installation.remove_instrument(Recorder())
        loopscope.uninstall()
        for bad in (Recorder(), [Recorder(), "x"], 3):
            with pytest.raises(loopscope.ConfigError, match="instruments"):
                loopscope.install(registry=CollectorRegistry(), instruments=bad)
            assert loopscope._installation.current() is None


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "loopscope" and hasattr(r, "event")]


class TestLoggingRoute:
    def test_a_record_with_every_field(
        self, loop_kind: str, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        loopscope.install(registry=registry, slow_threshold=0.05)
        with caplog.at_level(logging.WARNING, logger="loopscope"):
            run_blocking_task(loop_kind, 0.25)
        [record] = _records(caplog)
        assert record.levelno == logging.WARNING
        message = record.getMessage()
        assert "\n" not in message
        assert re.fullmatch(
            rf"loop MainThread blocked \d+ ms in task Task-\d+ \(\S*main\) at "
            rf"\S*{HERE.name}:{blocking_line()} in blocking_call",
            message,
        ), message
        fields = record.__dict__
        assert fields["event"] == "slow_callback" and fields["loop"] == "MainThread"
        assert fields["duration"] >= 0.25 and fields["threshold"] == 0.05
        assert fields["kind"] == "task" and fields["task"].startswith("Task-")
        assert fields["location"].endswith(f"{HERE.name}:{blocking_line()} in blocking_call")
        assert fields["blocking_stack"][-1] == f"{HERE}:{blocking_line()} in blocking_call"
        # The record points at the application's line, as a log call made there would.
        assert (record.pathname, record.lineno, record.funcName) == (
            str(HERE), blocking_line(), "blocking_call",
        )  # fmt: skip
        # The stack shows the test's frames and counts the others where they were (among
        # them loopscope's, which only the pure hot path has on the stack while a step runs).
        assert record.stack_info is not None
        lines = record.stack_info.splitlines()
        assert lines[0] == "Blocking stack (most recent call last):"
        assert lines[-1] == f'  File "{HERE}", line {blocking_line()}, in blocking_call'
        runs = [line for line in lines if re.fullmatch(r"  \(\d+ frames? of .*\)", line)]
        own_frames = any("loopscope" in line for line in runs)
        assert runs and own_frames == (_hotpath.twin is _hotpath.pure), lines
        shown = [line for line in lines[1:] if line not in runs]
        # (A runner that starts the tests from a string, as pytest-xdist does, shows it.)
        assert all(line.startswith((f'  File "{HERE}"', '  File "<string>"')) for line in shown), (
            lines
        )

    @pytest.mark.parametrize("log_stack", ["full", "none"])
    def test_log_stack(
        self,
        loop_kind: str,
        registry: CollectorRegistry,
        caplog: pytest.LogCaptureFixture,
        log_stack: str,
    ) -> None:
        loopscope.install(registry=registry, slow_threshold=0.05, log_stack=log_stack)
        with caplog.at_level(logging.WARNING, logger="loopscope"):
            run_blocking_task(loop_kind, 0.25)
        [record] = _records(caplog)
        stack = record.__dict__["blocking_stack"]
        if log_stack == "none":
            assert record.stack_info is None
        else:
            assert record.stack_info is not None
            assert len(record.stack_info.splitlines()) == 1 + len(stack)
            assert " frames of " not in record.stack_info

    def test_off(
        self, loop_kind: str, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        recorder = Recorder()
        loopscope.install(
            registry=registry, slow_threshold=0.05, events="off", instruments=[recorder]
        )
        with caplog.at_level(logging.DEBUG), capture_logs() as logs:
            run_blocking_task(loop_kind, 0.08)
        assert _records(caplog) == [] and logs == []
        assert len(recorder.slow) == 1

    def test_logging_even_with_structlog_configured(
        self, loop_kind: str, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        loopscope.install(registry=registry, slow_threshold=0.05, events="logging")
        with caplog.at_level(logging.WARNING, logger="loopscope"), capture_logs() as logs:
            run_blocking_task(loop_kind, 0.08)
        assert len(_records(caplog)) == 1 and logs == []


class TestStructlogRoute:
    def test_auto_follows_structlog_once_configured(
        self, loop_kind: str, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``auto`` asks at each event: configured structlog gets it, else logging."""
        loopscope.install(registry=registry, slow_threshold=0.05)
        with caplog.at_level(logging.WARNING, logger="loopscope"):
            run_blocking_task(loop_kind, 0.08)
            with capture_logs() as logs:  # configures structlog for its duration
                run_blocking_task(loop_kind, 0.08)
        assert len(_records(caplog)) == 1
        [event] = logs
        assert event["event"] == "slow_callback" and event["log_level"] == "warning"
        assert set(event) == {
            "event", "log_level", "loop", "duration", "threshold", "kind", "task", "coro",
            "blocking_stack", "location", "importing", "started",
        }  # fmt: skip
        assert event["blocking_stack"][-1] == f"{HERE}:{blocking_line()} in blocking_call"

    def test_structlog_even_unconfigured(
        self,
        loop_kind: str,
        registry: CollectorRegistry,
        caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``structlog`` is structlog's default output when nothing configured it."""
        loopscope.install(registry=registry, slow_threshold=0.05, events="structlog")
        with caplog.at_level(logging.WARNING, logger="loopscope"):
            run_blocking_task(loop_kind, 0.08)
        assert _records(caplog) == []
        out = capsys.readouterr().out
        assert "slow_callback" in out and "blocking_call" in out, out


class TestNoise:
    def test_a_short_block_is_one_line(
        self, loop_kind: str, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With the defaults (threshold 0.1 s, loop_blocked after 1 s), a 0.3 s block is
        one warning, not three."""
        loopscope.install(registry=registry)
        with caplog.at_level(logging.WARNING, logger="loopscope"):
            run_blocking_task(loop_kind, 0.3)
        assert [r.__dict__["event"] for r in _records(caplog)] == ["slow_callback"]

    def test_loop_blocked_is_for_hangs(
        self, loop_kind: str, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        loopscope.install(registry=registry, slow_threshold=0.05, loop_blocked_after=0.25)
        with caplog.at_level(logging.WARNING, logger="loopscope"):
            run_blocking_task(loop_kind, 0.45)  # reported at 0.25 s, next due at 0.5 s
        records = _records(caplog)
        events = [r.__dict__["event"] for r in records]
        assert events == ["loop_blocked", "slow_callback"], events
        assert 0.25 <= records[0].__dict__["blocked_for"] < 0.5
        message = records[0].getMessage()
        said = re.search(r"blocked for (\d+) ms so far, still running", message)
        assert said is not None and 250 <= int(said.group(1)) < 500, message


def _slow_modules(directory: Path, count: int, seconds: float) -> list[str]:
    """``count`` new modules in ``directory`` that each take ``seconds`` to import."""
    names = []
    for _ in range(count):
        name = f"slow_import_{uuid.uuid4().hex}"
        (directory / f"{name}.py").write_text(f"import time\n\ntime.sleep({seconds})\n")
        names.append(name)
    return names


@pytest.mark.parametrize(("import_events", "logged"), [("once", 1), ("all", 2), ("off", 0)])
def test_slow_imports(
    loop_kind: str,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    import_events: str,
    logged: int,
) -> None:
    """Steps that import modules (an application imported inside the running loop) are
    logged once by default, and said to be imports; instruments get every one."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = _slow_modules(tmp_path, 2, 0.25)
    recorder = Recorder()
    # "once" is the default: not given, so that the default is what is tested.
    given = {} if import_events == "once" else {"import_events": import_events}
    loopscope.install(registry=registry, slow_threshold=0.05, instruments=[recorder], **given)

    async def main() -> None:
        for name in names:
            await asyncio.sleep(0)
            __import__(name)

    loop = make_loop(loop_kind)
    try:
        with caplog.at_level(logging.WARNING, logger="loopscope"):
            loop.run_until_complete(main())
    finally:
        loop.close()
        for name in names:
            sys.modules.pop(name, None)
    assert [e.importing for e in recorder.slow] == [True, True]
    assert [e.location and e.location.startswith(f"{n}.py:3 in <module>") for e, n in
            zip(recorder.slow, names, strict=True)] == [True, True]  # fmt: skip
    records = _records(caplog)
    assert len(records) == logged
    for record in records:
        assert record.__dict__["importing"] is True
        assert " importing a module in task " in record.getMessage()
    if logged:
        assert records[0].__dict__["location"] == recorder.slow[0].location


def test_the_readme_example(loop_kind: str) -> None:
    """The instrument of the README's example counts blocks by line."""
    readme = (HERE.parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    [example] = [b for b in blocks if "(loopscope.Instrument)" in b]
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(example, "README.md", "exec"), namespace)
    run_blocking_task(loop_kind, 0.25, 0.25)
    counter = namespace["blocks"].count  # type: ignore[attr-defined]
    [(line, count)] = counter.items()
    assert count == 2 and line.endswith(f"{HERE.name}:{blocking_line()} in blocking_call")


class TestReadableStacks:
    """How a standard-logging record shows a stack (``log_stack=application``)."""

    def stack(self) -> list[str]:
        import asyncio as asyncio_module
        import sysconfig

        import prometheus_client

        scripts = sysconfig.get_path("scripts")
        package = os.path.dirname(prometheus_client.__file__)
        aio = os.path.dirname(asyncio_module.__file__)
        return [
            f"{scripts}/uvicorn:8 in <module>",
            f"{package}/registry.py:10 in run",
            f"{package}/registry.py:20 in serve",
            f"{aio}/base_events.py:1922 in _run_once",
            f"{HERE.parent}/app.py:3 in <module>",
            "<frozen importlib._bootstrap>:1176 in _find_and_load",
            "<frozen importlib._bootstrap_external>:940 in exec_module",
            f"{package}/metrics.py:7 in <module>",
        ]

    def test_runs_are_counted_where_they_are(self) -> None:
        from loopscope._stacks import application_stack

        stack = self.stack()
        assert application_stack(stack) == [
            "(4 frames of prometheus_client, asyncio and the launcher)",
            stack[4],
            "(2 frames of the import system)",  # inward of the app's line, still counted
            stack[7],  # what the app's line was waiting in
        ]

    def test_inward_the_first_call_and_the_last_two(self) -> None:
        from loopscope._stacks import application_stack

        package = os.path.dirname(self.stack()[1].rpartition(":")[0])
        inward = [f"{package}/lib.py:{n} in f{n}" for n in range(1, 6)]
        stack = [f"{HERE.parent}/app.py:3 in handler"]
        assert (
            application_stack([*stack, *inward])
            == [
                stack[0],
                inward[0],  # what the application called
                "(2 frames of prometheus_client)",
                *inward[-2:],  # what it was waiting in
            ]
        )

    def test_import_origin_in_the_message(self) -> None:
        from loopscope._event_logs import human_message
        from loopscope._stacks import application_location

        stack = tuple(self.stack())
        event = loopscope.SlowStep(
            loop="MainThread", threshold=0.1, kind="task", task="Task-1", coro="serve",
            callback=None, location=application_location(stack), blocking_stack=stack,
            importing=True, started=1.0, timestamp=2.0, thread="MainThread", duration=1.25,
        )  # fmt: skip
        assert event.location is not None and event.location.startswith("prometheus_client")
        assert human_message(event) == (
            "loop MainThread blocked 1.25 s importing a module (imported at "
            f"{application_location([stack[4]])}) in task Task-1 (serve) at {event.location}"
        )

    def test_a_deep_stack_keeps_both_ends(self) -> None:
        from loopscope._stacks import MAX_FRAMES, application_stack, format_stack

        def deep(n: int) -> list[str]:
            return deep(n - 1) if n else format_stack(sys._getframe())

        shallow = format_stack(sys._getframe())
        stack = deep(150)
        assert len(stack) == MAX_FRAMES + 1
        assert stack[:20] == shallow[:20]  # the outermost frames are kept
        [marker] = [e for e in stack if e.startswith("... (")]
        left_out = len(shallow) + 151 - MAX_FRAMES  # deep(150) to deep(0): 151 frames
        assert marker == f"... ({left_out} frames left out) ..."
        assert stack[-1].endswith(" in deep") and stack[-2].endswith(" in deep")
        assert marker in application_stack(stack)


def test_events_survive_dict_config(loop_kind: str, registry: CollectorRegistry) -> None:
    """A ``dictConfig`` after import (``disable_existing_loggers`` true, its default) does
    not silence loopscope: its logger is made at its first message, not at import."""
    import io
    import logging.config

    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logging.Logger.manager.loggerDict.pop("loopscope", None)  # as in a fresh process
    try:
        loopscope.install(registry=registry, slow_threshold=0.05)
        logging.config.dictConfig(
            {
                "version": 1,
                "formatters": {"plain": {"format": "%(name)s %(levelname)s %(message)s"}},
                "handlers": {
                    "out": {
                        "class": "logging.StreamHandler",
                        "stream": stream,
                        "formatter": "plain",
                    },
                },
                "root": {"handlers": ["out"], "level": "INFO"},
            }
        )
        run_blocking_task(loop_kind, 0.08)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    assert re.search(r"^loopscope WARNING loop MainThread blocked \d+ ms ", stream.getvalue(), re.M)
