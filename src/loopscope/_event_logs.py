"""loopscope's own output of events: an instrument that logs them where the application's
logs go.

The route (option ``events``): ``structlog`` logs each event through
``structlog.get_logger("loopscope")`` with its fields as key-value pairs; ``logging`` logs
it to the standard library's logger ``loopscope`` at WARNING, as a one-line message with
every field in the record (``extra``) and the blocking stack as the record's
``stack_info``; ``auto`` takes structlog when the application has configured it
(``structlog.is_configured()``, asked at each event) and standard logging otherwise.

Two options keep a production log readable: ``log_stack`` (how much of the stack a
standard-logging record shows; the ``blocking_stack`` field always has all of it) and
``import_events`` (slow steps that were importing modules, typically an application
imported inside the running loop at start-up: only the first step is logged by default).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import structlog

from ._instrument import Instrument, LoopBlocked, SlowStep, StepEvent
from ._log import NAME, logger
from ._stacks import application_entry, application_stack, frame_of, own_code_location

__all__ = ["LogOutput", "human_message", "log_notice"]


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1.0 else f"{value:.2f} s"


def human_message(event: StepEvent) -> str:
    """One line for a person: ``loop MainThread blocked 250 ms in task Task-6 (_handle) at
    app/handlers.py:42 in get_user``."""
    if isinstance(event, SlowStep):
        how_long = f"blocked {_seconds(event.duration)}"
    elif isinstance(event, LoopBlocked):
        how_long = f"blocked for {_seconds(event.blocked_for)} so far, still running,"
    else:
        how_long = "blocked"
    if event.importing:
        how_long += " importing a module"
        origin = own_code_location(event.blocking_stack)
        if origin is not None and origin != event.location:
            how_long += f" (imported at {origin})"
    if event.kind == "task":
        what = f"task {event.task}" + (f" ({event.coro})" if event.coro else "")
    else:
        what = f"callback {event.callback}"
    where = event.location or "an unknown line (the step ended before its stack was taken)"
    return f"loop {event.loop} {how_long} in {what} at {where}"


#: Fields of an event that are not logged: each log record and structlog event has its own
#: time and thread (the thread that logged it).
_NOT_LOGGED = ("thread", "timestamp")


def _structlog_fields(event: StepEvent) -> dict[str, Any]:
    """The key-value pairs of a structlog event: the event's fields but those not logged,
    with ``task`` and ``coro`` or ``callback``, whichever the kind has."""
    fields = event.fields()
    absent = ("callback",) if event.kind == "task" else ("task", "coro")
    for name in (*_NOT_LOGGED, *absent):
        del fields[name]
    if fields.get("coro", "") is None:
        del fields["coro"]
    return fields


def _stack_info(stack: list[str]) -> str | None:
    if not stack:
        return None
    lines = ["Blocking stack (most recent call last):"]
    for entry in stack:
        frame = frame_of(entry)
        if frame is None:
            lines.append(f"  {entry}")
        else:
            lines.append(f'  File "{frame[0]}", line {frame[1]}, in {frame[2]}')
    return "\n".join(lines)


class LogOutput(Instrument):
    """Logs every event through structlog or the standard library's logging."""

    def __init__(self, route: str, log_stack: str, import_events: str) -> None:
        self.route = route
        self.log_stack = log_stack
        self.import_events = import_events
        self._lock = threading.Lock()
        #: ``(loop, started)`` of the one importing step logged (``import_events=once``).
        self._import_step: tuple[str, float] | None = None

    def __repr__(self) -> str:
        return f"<loopscope's event log ({self.route})>"

    def slow_step(self, event: SlowStep) -> None:
        self._log(event)

    def loop_blocked(self, event: LoopBlocked) -> None:
        self._log(event)

    def _wanted(self, event: StepEvent) -> bool:
        if not event.importing or self.import_events == "all":
            return True
        if self.import_events == "off":
            return False
        step = (event.loop, event.started)
        with self._lock:
            if self._import_step is None:
                self._import_step = step
            return self._import_step == step

    def _log(self, event: StepEvent) -> None:
        if not self._wanted(event):
            return
        if _uses_structlog(self.route):
            structlog.get_logger("loopscope").warning(event.name, **_structlog_fields(event))
        else:
            self._log_record(event)

    def _log_record(self, event: StepEvent) -> None:
        if not logger().isEnabledFor(logging.WARNING):
            return
        fields = event.fields()
        for name in _NOT_LOGGED:
            del fields[name]
        fields["event"] = event.name
        # The record points at the application's line, as a log call made there would.
        entry = application_entry(event.blocking_stack)
        frame = frame_of(entry) if entry is not None else None
        path, lineno, function = frame if frame is not None else ("(unknown file)", 0, None)
        if self.log_stack == "full":
            stack = list(event.blocking_stack)
        elif self.log_stack == "application":
            stack = application_stack(event.blocking_stack)
        else:
            stack = []
        record = logger().makeRecord(
            NAME,
            logging.WARNING,
            path,
            lineno,
            human_message(event),
            (),
            None,
            function,
            fields,
            _stack_info(stack),
        )
        logger().handle(record)


def _uses_structlog(route: str) -> bool:
    return route == "structlog" or (route == "auto" and structlog.is_configured())


def log_notice(route: str, name: str, message: str, **fields: Any) -> None:
    """A message of loopscope's own (not an event about a step), on the same route."""
    if _uses_structlog(route):
        structlog.get_logger("loopscope").warning(name, detail=message, **fields)
    else:
        details = ", ".join(f"{key}={value}" for key, value in fields.items())
        logger().warning("loopscope: %s (%s)", message, details, extra={"event": name, **fields})
