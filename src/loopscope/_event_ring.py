"""The most recent events, kept for the endpoint's ``/loopscope/events`` path.

An instrument like any other (:mod:`._instrument`): the event dispatch hands it each
``slow_callback`` and ``loop_blocked`` event, off the hot path, and it keeps the last
``capacity`` of them in a bounded ring.  The endpoint's thread reads them as one JSON
document (:meth:`EventRing.json`) when a client such as ``loopscope top`` asks.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from typing import Any

from ._instrument import Instrument, LoopBlocked, SlowStep, StepEvent

__all__ = ["EVENTS_FORMAT", "EventRing"]

#: The version of the JSON document, in its ``loopscope_events`` field.
EVENTS_FORMAT = 1


class EventRing(Instrument):
    """Keeps the last ``capacity`` events as plain dicts, ready to serve as JSON."""

    def __init__(self, capacity: int = 100) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        #: Events kept since the process started (with those the ring has dropped since).
        self._seen = 0
        #: The last document built, and the value of ``_seen`` it was built for.
        self._document: tuple[int, bytes] | None = None

    def __repr__(self) -> str:
        return f"<loopscope's ring of recent events ({self.capacity})>"

    def slow_step(self, event: SlowStep) -> None:
        self._keep(event)

    def loop_blocked(self, event: LoopBlocked) -> None:
        self._keep(event)

    def _keep(self, event: StepEvent) -> None:
        fields = event.fields()
        fields["event"] = event.name
        with self._lock:
            self._seen += 1
            fields["seq"] = self._seen
            self._events.append(fields)

    def snapshot(self) -> list[dict[str, Any]]:
        """The events kept, oldest first."""
        with self._lock:
            return list(self._events)

    def json(self) -> bytes:
        """The JSON document the endpoint serves: the events, oldest first, with the
        process id.  Built again only after a new event: a client asking every second
        costs the application's GIL next to nothing while no step is slow."""
        with self._lock:
            if self._document is not None and self._document[0] == self._seen:
                return self._document[1]
            events = list(self._events)
            seen = self._seen
        document = {
            "loopscope_events": EVENTS_FORMAT,
            "pid": os.getpid(),
            "capacity": self.capacity,
            "seen": seen,
            "events": events,
        }
        body = json.dumps(document, default=str, separators=(",", ":")).encode()
        with self._lock:
            self._document = (seen, body)
        return body
