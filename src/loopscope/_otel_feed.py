"""Hands histograms that loopscope has already counted per bucket to an OpenTelemetry
SDK histogram, at a cost per bucket rather than per step.

The OpenTelemetry API has no asynchronous histogram: a histogram learns of a value only
through ``Histogram.record()``, one call per value (about 15 microseconds each on the SDK,
exemplar sampling included), so replaying the steps counted since the last export would
cost seconds of the exporting thread for a busy loop.  Instead, at collection time, each
bucket that gained steps gets one ``record()`` (so the SDK makes its aggregation, with the
provider's views, temporality and limits, as for any value), and then the SDK's explicit
bucket aggregation is given the rest of that bucket's count and the exact sum.  That last
part reads attributes the SDK keeps private; :func:`sdk_feedable` checks them first, and
where they are not what this module knows (another SDK, a proxy with no provider set
yet), nothing is recorded and the caller reports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["BucketFeed", "FeedUnavailable", "representative_values"]


class FeedUnavailable(RuntimeError):
    """The histogram is not one this module can hand whole buckets to."""


def representative_values(bounds: Sequence[float]) -> list[float]:
    """One value per bucket that falls in it: each bucket's upper bound (an OpenTelemetry
    bucket includes its upper bound, as Prometheus's ``le`` does), and just above the last
    bound for the overflow bucket."""
    return [*bounds, math.nextafter(bounds[-1], math.inf)]


def _real(instrument: Any) -> Any:
    """The SDK instrument behind the API's proxy (the global provider set after loopscope
    made its instruments), or ``instrument`` itself."""
    return getattr(instrument, "_real_instrument", None) or instrument


def _storages(real: Any) -> list[Any]:
    consumer = getattr(real, "_measurement_consumer", None)
    storages = getattr(consumer, "_reader_storages", None)
    if not isinstance(storages, Mapping):
        raise FeedUnavailable(
            f"{type(real).__module__}.{type(real).__qualname__} is not the "
            "opentelemetry-sdk histogram loopscope can hand whole buckets to"
        )
    return list(storages.values())


class BucketFeed:
    """Adds per-bucket counts to one SDK histogram whose bucket bounds are ``bounds``."""

    def __init__(self, instrument: Any, bounds: Sequence[float]) -> None:
        self.instrument = instrument
        self.bounds = tuple(bounds)
        self.values = representative_values(bounds)

    def check(self) -> None:
        """Raise :class:`FeedUnavailable` unless whole buckets can be handed over now."""
        _storages(_real(self.instrument))

    def add(self, attributes: Mapping[str, str], counts: Sequence[int], total: float) -> None:
        """Add ``counts[i]`` values to bucket ``i`` (the last is the overflow bucket), whose
        values add up to ``total`` seconds, under ``attributes``."""
        if not any(counts):
            return
        real = _real(self.instrument)
        storages = _storages(real)
        recorded = 0.0
        for value, count in zip(self.values, counts, strict=True):
            if count > 0:
                real.record(value, attributes)
                recorded += value
        changed = []
        for aggregation in self._aggregations(real, storages, attributes):
            if tuple(getattr(aggregation, "_boundaries", ())) != self.bounds:
                changed.append(type(aggregation).__name__)
                continue
            with aggregation._lock:
                buckets = aggregation._value
                if buckets is None:  # collected meanwhile: cannot happen inside a callback
                    continue
                for index, count in enumerate(counts):
                    if count > 1:
                        buckets[index] += count - 1
                aggregation._sum += total - recorded
        if changed:
            raise FeedUnavailable(
                f"a View gave {getattr(real, 'name', '?')} another aggregation or other "
                f"bucket boundaries ({', '.join(sorted(set(changed)))}), whose counts "
                "loopscope cannot make exact"
            )

    def _aggregations(
        self, real: Any, storages: list[Any], attributes: Mapping[str, str]
    ) -> Iterator[Any]:
        """The SDK aggregations (one per reader and view) the ``record()`` calls reached,
        except those of a View that drops the instrument."""
        for storage in storages:
            for match in list(storage._instrument_view_instrument_matches.get(real, ())):
                keys = match._view._attribute_keys
                wanted = dict(attributes)
                if keys is not None:
                    wanted = {k: v for k, v in wanted.items() if k in keys}
                for aggregation in list(match._attributes_aggregation.values()):
                    if type(aggregation).__name__ == "_DropAggregation":
                        continue
                    if dict(aggregation._attributes or {}) == wanted:
                        yield aggregation
