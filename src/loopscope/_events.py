"""The event path: slow and blocked steps made into events and handed to the instruments.

Kept apart from the counting path: the hot path calls :meth:`EventDispatch.slow_callback`
only once a step has already been found slow, and the watchdog calls
:meth:`EventDispatch.loop_blocked` from its own thread.  With no instrument interested,
neither builds anything.  Every output is an instrument (:mod:`._instrument`): the log
outputs (:mod:`._event_logs`), the recorder of ``loopscope.testing`` and the application's
own.  An instrument that raises is reported once through the standard library's logging
and removed; the error never reaches the loop or the application.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from ._describe import describe_callback, task_fields
from ._instrument import HOOKS, Instrument, LoopBlocked, SlowStep, StepEvent, overridden_hooks
from ._log import logger
from ._stacks import is_importing

__all__ = ["EventDispatch"]


class EventDispatch:
    """Makes ``slow_callback`` and ``loop_blocked`` events and calls the instruments."""

    def __init__(self, instruments: tuple[Instrument, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._reported: set[str] = set()
        self.instruments: tuple[Instrument, ...] = ()
        #: hook name -> the bound hooks to call, rebuilt on every change (read lock-free).
        self._hooks: dict[str, tuple[Any, ...]] = {name: () for name in HOOKS}
        for instrument in instruments:
            self.add(instrument)

    def add(self, instrument: Instrument) -> None:
        """Call ``instrument``'s hooks from now on (adding it twice adds nothing)."""
        with self._lock:
            if any(x is instrument for x in self.instruments):
                return
            self.instruments = (*self.instruments, instrument)
            self._rebuild()

    def remove(self, instrument: Instrument) -> bool:
        """Stop calling ``instrument``; False if it was not there."""
        with self._lock:
            kept = tuple(x for x in self.instruments if x is not instrument)
            if len(kept) == len(self.instruments):
                return False
            self.instruments = kept
            self._rebuild()
            return True

    def _rebuild(self) -> None:
        hooks: dict[str, list[Any]] = {name: [] for name in HOOKS}
        for instrument in self.instruments:
            for name in overridden_hooks(instrument):
                hooks[name].append((instrument, getattr(instrument, name)))
        self._hooks = {name: tuple(found) for name, found in hooks.items()}

    def wants(self, hook: str) -> bool:
        """Whether any instrument overrides ``hook``."""
        return bool(self._hooks[hook])

    def slow_callback(
        self,
        loop: str,
        duration: float,
        threshold: float,
        callback: object,
        task: object | None,
        *,
        started: float,
        blocking_stack: list[str],
        location: str | None,
    ) -> None:
        """A step ended after ``duration`` seconds, at or over ``threshold``."""
        self._dispatch(
            "slow_step", SlowStep, (loop, threshold, callback, task, started, blocking_stack,
            location), duration=round(duration, 6),
        )  # fmt: skip

    def loop_blocked(
        self,
        loop: str,
        blocked_for: float,
        threshold: float,
        callback: object,
        task: object | None,
        *,
        started: float,
        blocking_stack: list[str],
        location: str | None,
    ) -> None:
        """A step has been running for ``blocked_for`` seconds and is still running."""
        self._dispatch(
            "loop_blocked", LoopBlocked, (loop, threshold, callback, task, started,
            blocking_stack, location), blocked_for=round(blocked_for, 6),
        )  # fmt: skip

    def _dispatch(
        self, hook: str, kind: type[StepEvent], step: tuple[Any, ...], **measure: float
    ) -> None:
        hooks = self._hooks[hook]
        if not hooks:
            return  # nobody listens: nothing is built
        event = self._make(kind, step, measure)
        if event is not None:
            self._deliver(hook, hooks, event)

    def _make(
        self, kind: type[StepEvent], step: tuple[Any, ...], measure: dict[str, Any]
    ) -> StepEvent | None:
        """The event: ``step`` is ``(loop, threshold, callback, task, started,
        blocking_stack, location)``; ``measure`` the duration or the time blocked so far."""
        loop, threshold, callback, task, started, blocking_stack, location = step
        try:
            about: dict[str, Any]
            if task is not None:
                described = task_fields(task)
                about = {"kind": "task", "task": described.get("task"),
                         "coro": described.get("coro"), "callback": None}  # fmt: skip
            else:
                about = {"kind": "callback", "task": None, "coro": None,
                         "callback": describe_callback(callback)}  # fmt: skip
            stack = tuple(blocking_stack)
            return kind(
                loop=loop,
                threshold=threshold,
                location=location,
                blocking_stack=stack,
                importing=is_importing(stack),
                started=started,
                timestamp=time.time(),
                thread=threading.current_thread().name,
                **about,
                **measure,
            )
        except Exception as exc:
            self._report_once(f"describing a {kind.name} event", exc)
            return None

    def _deliver(self, name: str, hooks: tuple[Any, ...], event: StepEvent) -> None:
        for instrument, hook in hooks:
            try:
                hook(event)
            except Exception as exc:
                if self.remove(instrument):
                    self._report_removed(instrument, name, exc)

    @staticmethod
    def _report_removed(instrument: Instrument, name: str, exc: Exception) -> None:
        with contextlib.suppress(Exception):
            logger().error(
                "loopscope: the instrument %r raised in %s() and was removed; the "
                "application goes on",
                instrument,
                name,
                exc_info=(type(exc), exc, exc.__traceback__),
            )

    def _report_once(self, what: str, exc: Exception) -> None:
        if what in self._reported:
            return
        self._reported.add(what)
        with contextlib.suppress(Exception):
            logger().error("loopscope: error while %s: %r", what, exc)
