"""The event path: slow steps reported through structlog.

Kept apart from the counting path: the hot path only calls :meth:`SlowEventLog.slow_callback`
once a step has already been found slow.  A failure anywhere in the logging pipeline (a
processor that raises, a closed stream) is reported once through the standard library's
logging and then switches the events off; it never reaches the application.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

from ._describe import describe_callback, task_fields

__all__ = ["SlowEventLog"]

_fallback = logging.getLogger("loopscope")


class SlowEventLog:
    """Emits ``slow_callback`` (and, later, ``loop_blocked``) events."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.logger = structlog.get_logger("loopscope")

    def slow_callback(
        self,
        loop: str,
        duration: float,
        threshold: float,
        callback: object,
        task: object | None,
        **extra: Any,
    ) -> None:
        """Log one slow step.  Durations are in seconds."""
        if not self.enabled:
            return
        fields: dict[str, Any] = {
            "loop": loop,
            "duration": round(duration, 6),
            "threshold": threshold,
        }
        try:
            if task is not None:
                fields.update(task_fields(task))
            else:
                fields["callback"] = describe_callback(callback)
            fields.update(extra)
            self.logger.warning("slow_callback", **fields)
        except Exception as exc:
            self.enabled = False
            _fallback.error(
                "loopscope: logging a slow_callback event failed (%r); "
                "slow-step events are switched off, metrics go on",
                exc,
            )
