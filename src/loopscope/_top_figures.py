"""What ``loopscope top`` and ``loopscope report`` compute: the figures of one loopscope
endpoint read over HTTP, and the rates between two reads.

Kept apart from any rendering: :mod:`._top` draws these figures in a terminal and
:mod:`._report` in an HTML page.  An endpoint is read with the standard library only
(``urllib``); every way it can fail becomes an :class:`EndpointError` with a one-line
message for the user.
"""

from __future__ import annotations

import base64
import json
import math
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

from ._server import EVENTS_PATH

__all__ = [
    "Endpoint",
    "EndpointError",
    "ExecutorFigures",
    "LoopFigures",
    "LoopRates",
    "Scrape",
    "default_url",
    "normalize_url",
    "parse_exposition",
    "quantile",
    "rates",
]

#: Seconds to wait for an endpoint's answer.
TIMEOUT = 5.0


class EndpointError(Exception):
    """An endpoint could not be read; ``str()`` is one line for the user.  ``lasting`` is
    True for an error that waiting will not cure (a bad URL, wrong credentials, something
    that is not loopscope), False for one that may (nothing listening, no answer)."""

    def __init__(self, message: str, *, lasting: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.lasting = lasting
        #: The HTTP status the endpoint answered, if it answered.
        self.status = status


def normalize_url(text: str) -> str:
    """The full URL of the ``/metrics`` page ``text`` names: ``host:port`` and
    ``http://host:port`` mean ``http://host:port/metrics``.  Raises :class:`EndpointError`
    for what is no http(s) URL."""
    given = text.strip()
    candidate = given if "://" in given else f"http://{given}"
    try:
        parts = urlsplit(candidate)
        port = parts.port
    except ValueError as exc:
        raise EndpointError(f"bad URL {text!r}: {exc}", lasting=True) from None
    if parts.scheme not in ("http", "https"):
        raise EndpointError(
            f"bad URL {text!r}: loopscope endpoints are http:// or https:// URLs", lasting=True
        )
    if not parts.hostname or any(c.isspace() for c in given) or not given:
        raise EndpointError(
            f"bad URL {text!r}: give host:port or http://host:port/metrics", lasting=True
        )
    del port  # read only to have it checked
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def default_url(environ: Mapping[str, str]) -> str:
    """The endpoint of a service started with the same ``LOOPSCOPE_PORT`` (and
    ``LOOPSCOPE_ADDR``), else ``http://127.0.0.1:9100/metrics``."""
    port = environ.get("LOOPSCOPE_PORT", "").strip() or "9100"
    addr = environ.get("LOOPSCOPE_ADDR", "").strip() or "127.0.0.1"
    if addr in ("0.0.0.0", "::"):
        addr = "127.0.0.1" if addr == "0.0.0.0" else "::1"
    host = f"[{addr}]" if ":" in addr else addr
    scheme = "https" if environ.get("LOOPSCOPE_TLS_CERTFILE", "").strip() else "http"
    return f"{scheme}://{host}:{port}/metrics"


class Endpoint:
    """One loopscope endpoint: its ``/metrics`` URL, and the credentials and CA to read it."""

    def __init__(
        self,
        url: str,
        *,
        user: str | None = None,
        password: str | None = None,
        cafile: str | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.url = normalize_url(url)
        parts = urlsplit(self.url)
        self.events_url = urlunsplit((parts.scheme, parts.netloc, EVENTS_PATH, "", ""))
        #: How the endpoint is named on screen: ``host:port``.
        self.name = parts.netloc
        self.timeout = timeout
        self._headers = {"User-Agent": "loopscope-top"}
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            try:
                self._context = ssl.create_default_context(cafile=cafile)
            except (OSError, ssl.SSLError) as exc:
                raise EndpointError(
                    f"--cafile {cafile!r}: cannot load CA certificates ({exc})", lasting=True
                ) from None

    def _get(self, url: str) -> tuple[bytes, str]:
        """The body and content type of ``url``; raises :class:`EndpointError`."""
        request = urllib.request.Request(url, headers=self._headers)
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout, context=self._context
            ) as response:
                return response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the connection
            raise _http_error(url, exc.code, exc.reason) from None
        except urllib.error.URLError as exc:
            raise _connection_error(self.name, exc.reason) from None
        except (OSError, ValueError) as exc:
            raise _connection_error(self.name, exc) from None

    def scrape(self) -> Scrape:
        """Read ``/metrics`` now."""
        body, _type = self._get(self.url)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _not_loopscope(self.url, "the answer is not text") from None
        return parse_exposition(text, self.url)

    def events(self) -> list[dict[str, Any]] | None:
        """The recent events the endpoint serves, oldest first; None where it serves none
        (``events_endpoint=false``, an application's own ``/metrics`` route, or a version
        of loopscope without them)."""
        try:
            body, _type = self._get(self.events_url)
        except EndpointError as exc:
            if exc.status == 404:
                return None
            raise
        try:
            document = json.loads(body)
            events = document["events"]
            pid = document.get("pid")
        except (ValueError, KeyError, TypeError):
            return []
        found = [event for event in events if isinstance(event, dict)]
        for event in found:
            event["pid"] = pid
        return found


def _http_error(url: str, code: int, reason: object) -> EndpointError:
    if code == 401:
        return EndpointError(
            f"{url}: 401 Unauthorized: wrong or missing credentials (give --user and "
            "--password-file)",
            lasting=True,
            status=code,
        )
    if code == 404:
        return _not_loopscope(url, "404 Not Found", status=code)
    return EndpointError(f"{url}: answered {code} {reason}", lasting=code < 500, status=code)


def _not_loopscope(url: str, why: str, status: int | None = None) -> EndpointError:
    return EndpointError(
        f"{url}: not a loopscope endpoint ({why}); give the URL of a service's loopscope /metrics",
        lasting=True,
        status=status,
    )


def _connection_error(name: str, reason: object) -> EndpointError:
    if isinstance(reason, ConnectionRefusedError):
        return EndpointError(
            f"{name}: connection refused: nothing listens there (is the service running, "
            "with loopscope's port?)",
            lasting=False,
        )
    if isinstance(reason, ssl.SSLCertVerificationError):
        return EndpointError(
            f"{name}: the endpoint's certificate is not trusted ({reason.verify_message}); "
            "give the CA that signed it with --cafile",
            lasting=True,
        )
    if isinstance(reason, ssl.SSLError):
        return EndpointError(
            f"{name}: TLS failed ({reason.reason or reason}); is it an https:// endpoint?",
            lasting=True,
        )
    if isinstance(reason, socket.gaierror):
        return EndpointError(
            f"{name}: cannot resolve the host ({reason.strerror or reason})", lasting=True
        )
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return EndpointError(f"{name}: no answer within {TIMEOUT:g} s", lasting=False)
    if isinstance(reason, ConnectionError) or "RemoteDisconnected" in type(reason).__name__:
        return EndpointError(f"{name}: the connection was closed ({reason})", lasting=False)
    text = getattr(reason, "strerror", None) or str(reason)
    return EndpointError(f"{name}: {text}", lasting=False)


# --- figures -------------------------------------------------------------------------------


@dataclass
class LoopFigures:
    """The figures of one ``loop`` label in one scrape: counters as read (cumulative)."""

    implementation: str = ""
    busy_seconds: float = 0.0
    task_steps: float = 0.0
    slow_steps: float = 0.0
    blocked_seconds: float = 0.0
    tasks_alive: float = 0.0
    tasks_created: float = 0.0
    #: Upper bound (seconds) -> cumulative count, ``+Inf`` included.
    lag_buckets: dict[float, float] = field(default_factory=dict)
    #: Slow steps by the application line that blocked.
    locations: dict[str, float] = field(default_factory=dict)


@dataclass
class ExecutorFigures:
    """The figures of one executor of one loop in one scrape."""

    busy: float = 0.0
    workers_max: float = 0.0
    queue_buckets: dict[float, float] = field(default_factory=dict)


@dataclass
class Scrape:
    """What one read of ``/metrics`` found, with when it was read."""

    url: str
    at: float  # time.monotonic()
    wall: float  # time.time()
    loops: dict[str, LoopFigures] = field(default_factory=dict)
    executors: dict[tuple[str, str], ExecutorFigures] = field(default_factory=dict)


_COUNTERS = {
    "asyncio_loop_busy_seconds_total": "busy_seconds",
    "asyncio_loop_task_steps_total": "task_steps",
    "asyncio_loop_slow_callbacks_total": "slow_steps",
    "asyncio_loop_blocked_seconds_total": "blocked_seconds",
    "asyncio_tasks_created_total": "tasks_created",
    "asyncio_tasks": "tasks_alive",
}


def parse_exposition(text: str, url: str = "") -> Scrape:
    """The figures of one exposition; raises :class:`EndpointError` when it is not
    loopscope's (no ``asyncio_loop_info``)."""
    now = Scrape(url=url, at=time.monotonic(), wall=time.time())
    seen_info = False
    try:
        families = list(text_string_to_metric_families(text))
    except Exception:
        raise _not_loopscope(url, "the answer is not a Prometheus exposition") from None
    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            loop_label = labels.get("loop")
            if loop_label is None:
                continue
            if name == "asyncio_loop_info":
                seen_info = True
                now.loops.setdefault(loop_label, LoopFigures()).implementation = labels.get(
                    "implementation", ""
                )
            elif name in _COUNTERS:
                figures = now.loops.setdefault(loop_label, LoopFigures())
                setattr(figures, _COUNTERS[name], getattr(figures, _COUNTERS[name]) + value)
            elif name == "asyncio_loop_lag_seconds_bucket":
                buckets = now.loops.setdefault(loop_label, LoopFigures()).lag_buckets
                bound = float(labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + value
            elif name == "asyncio_loop_slow_callbacks_by_location_total":
                places = now.loops.setdefault(loop_label, LoopFigures()).locations
                where = labels.get("location", "unknown")
                places[where] = places.get(where, 0.0) + value
            elif name.startswith("asyncio_executor_"):
                _executor_sample(now, name, labels, value)
    if not seen_info:
        raise _not_loopscope(url, "its answer has no asyncio_loop_info metric")
    return now


def _executor_sample(now: Scrape, name: str, labels: Mapping[str, str], value: float) -> None:
    key = (labels["loop"], labels.get("executor", ""))
    figures = now.executors.setdefault(key, ExecutorFigures())
    if name == "asyncio_executor_workers_busy":
        figures.busy = value
    elif name == "asyncio_executor_workers_max":
        figures.workers_max = value
    elif name == "asyncio_executor_queue_delay_seconds_bucket":
        bound = float(labels["le"])
        figures.queue_buckets[bound] = figures.queue_buckets.get(bound, 0.0) + value


def quantile(before: Mapping[float, float], after: Mapping[float, float], q: float) -> float | None:
    """The ``q``-quantile (seconds) of the observations between two reads of a histogram's
    cumulative buckets, interpolated within its bucket as Prometheus's
    ``histogram_quantile`` does; None when nothing was observed in between."""
    bounds = sorted(after)
    deltas = [(bound, after[bound] - before.get(bound, 0.0)) for bound in bounds]
    if not deltas or deltas[-1][1] <= 0:
        return None
    total = deltas[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in deltas:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bound: that bound is all one knows
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = bound, cumulative
    return lower


@dataclass
class LoopRates:
    """One loop of one endpoint over the interval between two scrapes."""

    endpoint: str
    loop: str
    implementation: str
    seconds: float
    lag_p50: float | None
    lag_p99: float | None
    utilization: float
    steps_per_second: float
    tasks_alive: float
    tasks_created_per_second: float
    slow_steps: float
    blocked_seconds: float
    executors_busy: float
    executors_max: float
    queue_p99: float | None

    def as_dict(self) -> dict[str, Any]:
        """The plain values (for a recording)."""
        return dict(self.__dict__)


def rates(before: Scrape, after: Scrape, endpoint: str) -> list[LoopRates]:
    """Each loop of ``after`` over the interval since ``before`` (a loop new in ``after``
    counts from zero)."""
    seconds = max(after.at - before.at, 1e-9)
    found = []
    for name, now in sorted(after.loops.items()):
        then = before.loops.get(name, LoopFigures())
        busy = now.busy_seconds - then.busy_seconds
        executors = [(k, v) for k, v in after.executors.items() if k[0] == name]
        queue_p99s = [
            quantile(before.executors.get(k, ExecutorFigures()).queue_buckets, v.queue_buckets,
                     0.99)
            for k, v in executors
        ]  # fmt: skip
        known = [x for x in queue_p99s if x is not None]
        found.append(
            LoopRates(
                endpoint=endpoint,
                loop=name,
                implementation=now.implementation,
                seconds=seconds,
                lag_p50=quantile(then.lag_buckets, now.lag_buckets, 0.5),
                lag_p99=quantile(then.lag_buckets, now.lag_buckets, 0.99),
                utilization=min(1.0, max(0.0, busy / seconds)),
                steps_per_second=max(0.0, now.task_steps - then.task_steps) / seconds,
                tasks_alive=now.tasks_alive,
                tasks_created_per_second=max(0.0, now.tasks_created - then.tasks_created) / seconds,
                slow_steps=max(0.0, now.slow_steps - then.slow_steps),
                blocked_seconds=max(0.0, now.blocked_seconds - then.blocked_seconds),
                executors_busy=sum(v.busy for _k, v in executors),
                executors_max=sum(v.workers_max for _k, v in executors),
                queue_p99=max(known) if known else None,
            )
        )
    return found


def location_counts(first: Scrape, last: Scrape) -> dict[tuple[str, str], float]:
    """Slow steps by ``(loop, location)`` between two scrapes, the busiest first."""
    counts: dict[tuple[str, str], float] = {}
    for loop_label, figures in last.loops.items():
        then = first.loops.get(loop_label, LoopFigures()).locations
        for where, count in figures.locations.items():
            delta = count - then.get(where, 0.0)
            if delta > 0:
                counts[(loop_label, where)] = delta
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
