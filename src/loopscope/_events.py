"""The event path: slow and blocked steps reported through structlog and to listeners.

Kept apart from the counting path: the hot path only calls :meth:`SlowEventLog.slow_callback`
once a step has already been found slow, and the watchdog calls
:meth:`SlowEventLog.loop_blocked` from its own thread.  A failure anywhere in the logging
pipeline (a processor that raises, a closed stream) is reported once through the standard
library's logging and then switches the structlog output off; it never reaches the
application.  Listeners (``loopscope.testing``) receive every event as a dict.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import structlog

from ._describe import describe_callback, task_fields

__all__ = ["EventListener", "SlowEventLog"]

_fallback = logging.getLogger("loopscope")

EventListener = Callable[[dict[str, Any]], None]


class SlowEventLog:
    """Emits ``slow_callback`` and ``loop_blocked`` events."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.logger = structlog.get_logger("loopscope")
        self.listeners: list[EventListener] = []
        self._lock = threading.Lock()

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for every event from now on."""
        with self._lock:
            self.listeners = [*self.listeners, listener]

    def remove_listener(self, listener: EventListener) -> None:
        """Stop calling ``listener``."""
        with self._lock:
            self.listeners = [x for x in self.listeners if x is not listener]

    def slow_callback(
        self,
        loop: str,
        duration: float,
        threshold: float,
        callback: object,
        task: object | None,
        **extra: Any,
    ) -> None:
        """A step ended after ``duration`` seconds, at or over ``threshold``."""
        self._emit("slow_callback", loop, callback, task, duration=round(duration, 6),
                   threshold=threshold, **extra)  # fmt: skip

    def loop_blocked(
        self,
        loop: str,
        blocked_for: float,
        threshold: float,
        callback: object,
        task: object | None,
        **extra: Any,
    ) -> None:
        """A step has been running for ``blocked_for`` seconds and is still running."""
        self._emit("loop_blocked", loop, callback, task, blocked_for=round(blocked_for, 6),
                   threshold=threshold, **extra)  # fmt: skip

    def _emit(
        self, event: str, loop: str, callback: object, task: object | None, **values: Any
    ) -> None:
        if not self.enabled and not self.listeners:
            return
        fields: dict[str, Any] = {"loop": loop}
        try:
            fields.update(values)
            if task is not None:
                fields.update(task_fields(task))
            else:
                fields["callback"] = describe_callback(callback)
        except Exception as exc:
            self._failed(event, exc)
            return
        for listener in self.listeners:
            try:
                listener({"event": event, **fields})
            except Exception as exc:
                _fallback.error("loopscope: an event listener failed: %r", exc)
        if self.enabled:
            try:
                self.logger.warning(event, **fields)
            except Exception as exc:
                self._failed(event, exc)

    def _failed(self, event: str, exc: Exception) -> None:
        self.enabled = False
        _fallback.error(
            "loopscope: logging a %s event failed (%r); loopscope's events are switched "
            "off, metrics go on",
            event,
            exc,
        )
