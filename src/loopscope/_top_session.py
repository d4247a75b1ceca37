"""What ``loopscope top`` keeps between two reads of its endpoints: each endpoint's last
scrape, whether it is down, a history of lag and utilization per loop, the recent events,
and the recording (``--record``), a file of JSON lines that ``loopscope report`` reads.

No rendering here: :mod:`._top` draws a :class:`TopSession`.
"""

from __future__ import annotations

import collections
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from ._top_figures import Endpoint, EndpointError, LoopRates, Scrape, location_counts, rates

__all__ = ["RECORDING_FORMAT", "TopSession", "Watched", "read_recording"]

#: The version of a recording, in its first line.
RECORDING_FORMAT = 1
#: Points of history kept per loop (ten minutes at one a second).
HISTORY = 600
#: Recent events kept per endpoint.
EVENTS_KEPT = 200


@dataclass
class Watched:
    """One endpoint as ``top`` sees it."""

    endpoint: Endpoint
    #: The scrape the figures on screen start from, and the first one since it came up.
    last: Scrape | None = None
    first: Scrape | None = None
    #: Why the last read failed; None while the endpoint is up.
    down: str | None = None
    rows: list[LoopRates] = field(default_factory=list)
    #: loop label -> (lag p99 or None, utilization) per interval, oldest first.
    history: dict[str, collections.deque[tuple[float | None, float]]] = field(default_factory=dict)
    events: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=EVENTS_KEPT)
    )
    seen: set[tuple[Any, Any]] = field(default_factory=set)
    #: Whether the endpoint serves its recent events (``/loopscope/events``).
    serves_events: bool = True

    def locations(self) -> dict[tuple[str, str], float]:
        """Slow steps by (loop, location) since the endpoint came up."""
        if self.first is None or self.last is None:
            return {}
        return location_counts(self.first, self.last)


class TopSession:
    """Reads every endpoint once per :meth:`poll`, in parallel, and keeps what it found."""

    def __init__(self, endpoints: list[Endpoint], record: IO[str] | None = None) -> None:
        self.watched = [Watched(endpoint) for endpoint in endpoints]
        self.record = record
        self.polls = 0
        self._pool = ThreadPoolExecutor(max_workers=min(8, max(1, len(endpoints))))
        if record is not None:
            self._write({"kind": "start", "format": RECORDING_FORMAT, "time": time.time(),
                         "endpoints": [e.url for e in endpoints]})  # fmt: skip

    def close(self) -> None:
        """Stop the reading threads (the recording file is the caller's to close)."""
        self._pool.shutdown(wait=False)

    def poll(self) -> list[tuple[Watched, dict[str, Any]]]:
        """Read every endpoint; the events new since the last poll, oldest first."""
        results = list(self._pool.map(_read, [w.endpoint for w in self.watched]))
        new_events: list[tuple[Watched, dict[str, Any]]] = []
        for watched, (scrape, events, error) in zip(self.watched, results, strict=True):
            if error is not None or scrape is None:
                watched.down = str(error)
                watched.rows = []
                self._write({"kind": "down", "time": time.time(),
                             "endpoint": watched.endpoint.url, "error": str(error)})  # fmt: skip
                continue
            self._take(watched, scrape)
            watched.serves_events = events is not None
            for event in events or ():
                key = (event.get("pid"), event.get("seq"))
                if key in watched.seen:
                    continue
                watched.seen.add(key)
                event["endpoint"] = watched.endpoint.name
                watched.events.append(event)
                new_events.append((watched, event))
                self._write({"kind": "event", "endpoint": watched.endpoint.url, "event": event})
        self.polls += 1
        return new_events

    def _take(self, watched: Watched, scrape: Scrape) -> None:
        before = watched.last
        watched.down = None
        if before is None or _restarted(before, scrape):
            # The first scrape of the endpoint, or of a restarted service: figures count
            # from here on.
            watched.first = watched.last = scrape
            watched.rows = []
            return
        watched.rows = rates(before, scrape, watched.endpoint.name)
        watched.last = scrape
        for row in watched.rows:
            history = watched.history.setdefault(row.loop, collections.deque(maxlen=HISTORY))
            history.append((row.lag_p99, row.utilization))
        if self.record is not None:
            self._write({
                "kind": "interval",
                "time": scrape.wall,
                "endpoint": watched.endpoint.url,
                "loops": [row.as_dict() for row in watched.rows],
                "locations": [[loop, where, count]
                              for (loop, where), count in watched.locations().items()],
            })  # fmt: skip

    def _write(self, entry: dict[str, Any]) -> None:
        if self.record is None:
            return
        self.record.write(json.dumps(entry, default=str) + "\n")
        self.record.flush()


def _restarted(before: Scrape, after: Scrape) -> bool:
    """Whether a counter went down: the service restarted between the two scrapes."""
    for name, now in after.loops.items():
        then = before.loops.get(name)
        if then is not None and now.task_steps < then.task_steps:
            return True
    return False


def _read(
    endpoint: Endpoint,
) -> tuple[Scrape | None, list[dict[str, Any]] | None, Exception | None]:
    try:
        scrape = endpoint.scrape()
        events = endpoint.events()
    except EndpointError as exc:
        return None, [], exc
    except Exception as exc:  # a fault of ours: shown as the endpoint's error, top goes on
        return None, [], EndpointError(f"{endpoint.name}: {exc!r}", lasting=False)
    return scrape, events, None


def read_recording(path: str) -> list[dict[str, Any]]:
    """The entries of a recording, in order; raises ValueError for what is not one."""
    entries: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                if number > 1 and not line.endswith("\n"):
                    break  # the last line of a recording cut short
                if number == 1:
                    raise ValueError(f"{path}: not a loopscope top recording") from None
                raise ValueError(f"{path}:{number}: not a line of a loopscope recording") from None
            if not isinstance(entry, dict) or (number == 1 and entry.get("kind") != "start"):
                raise ValueError(f"{path}: not a loopscope top recording")
            entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: empty, not a loopscope top recording")
    return entries
