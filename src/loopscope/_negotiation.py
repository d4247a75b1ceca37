"""What a /metrics request asks for, and the exposition that answers it.

Every way out of /metrics (the endpoint, the ASGI app, the aiohttp handler) answers as
prometheus_client's own server does: the format is chosen from ``Accept`` by
prometheus_client's ``choose_encoder`` (OpenMetrics when asked for, the Prometheus text
format otherwise, each with its content type), the body is gzipped when
``Accept-Encoding`` accepts it (``gzip_accepted``), and ``?name[]=...`` restricts the
families to the names given (``restricted_registry``).

:class:`KeptExposition` collects the registry at most once per ``reuse_seconds`` and keeps
each form asked for (format, compression, names) until the next collection, so scrapers
asking for different forms cost one collection, not one each.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import parse_qs

from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["KeptExposition", "Wanted", "wanted"]


@dataclass(frozen=True)
class Wanted:
    """The form of the exposition one request asks for."""

    #: prometheus_client's encoder for the format (text or OpenMetrics, with its escaping).
    encoder: Callable[[Collector], bytes]
    #: The ``Content-Type`` of the answer.
    content_type: str
    #: Whether the body is gzipped (``Content-Encoding: gzip``).
    gzip: bool
    #: The family names of ``?name[]=``, sorted, or None for every family.
    names: tuple[str, ...] | None

    @property
    def key(self) -> tuple[str, bool, tuple[str, ...] | None]:
        # The content type names the format, its version and its escaping: one encoder each.
        return self.content_type, self.gzip, self.names


def wanted(accept: str | None, accept_encoding: str | None, query: str) -> Wanted:
    """The form asked for by a request's ``Accept`` and ``Accept-Encoding`` headers (each
    sent more than once joined with commas, as WSGI and ASGI servers join them) and its
    query string."""
    encoder, content_type = choose_encoder(accept or "")
    names = parse_qs(query).get("name[]")
    return Wanted(
        encoder,
        content_type,
        gzip_accepted(accept_encoding or ""),
        tuple(sorted(set(names))) if names else None,
    )


class _Collected(Collector):
    """Families already collected, for the encoders, which ask a registry for them."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


class KeptExposition:
    """The registry's families, collected at most once per ``reuse_seconds``, and the bodies
    made of them.  Safe to use from any thread; every build happens under ``build_lock``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        reuse_seconds: float,
        before_build: Callable[[], None] | None = None,
    ) -> None:
        self.registry = registry
        self.reuse_seconds = reuse_seconds
        self.before_build = before_build
        self.collected_at = float("-inf")
        self.metrics: list[Metric] | None = None
        self.bodies: dict[tuple[str, bool, tuple[str, ...] | None], bytes] = {}
        #: Held while the registry is collected or a body made (the registry's own lock is
        #: taken meanwhile); held across a fork by the installation.
        self.build_lock = threading.Lock()

    def body(self, form: Wanted) -> bytes:
        """The body for ``form``; raises what a collector raised (nothing is kept then)."""
        with self.build_lock:
            metrics = self._metrics()
            body = self.bodies.get(form.key)
            if body is None:
                source: Collector | CollectorRegistry = (
                    _Collected(metrics)
                    if form.names is None
                    else self.registry.restricted_registry(form.names)
                )
                body = form.encoder(source)
                if form.gzip:
                    body = gzip.compress(body)
                self.bodies[form.key] = body
            return body

    def fresh_for(self) -> float:
        """Seconds before the next collection is due."""
        return max(0.0, self.collected_at + self.reuse_seconds - time.monotonic())

    def _metrics(self) -> list[Metric]:
        metrics = self.metrics
        if metrics is None or time.monotonic() - self.collected_at >= self.reuse_seconds:
            # A failed collection is not kept: the next scrape tries again.
            self.metrics = None
            self.bodies.clear()
            if self.before_build is not None:
                self.before_build()
            metrics = list(self.registry.collect())
            self.metrics = metrics
            self.collected_at = time.monotonic()
        return metrics
