"""Explicit routes to an instrumented loop: loop factories and an event-loop policy."""

from __future__ import annotations

import asyncio
from typing import Any

from ._installation import instrument

__all__ = ["new_event_loop", "new_uvloop_event_loop", "policy_class"]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new instrumented asyncio loop; a ``loop_factory`` for ``asyncio.run`` (3.12+)
    and ``asyncio.Runner`` (3.11+)."""
    return instrument(asyncio.SelectorEventLoop())


def new_uvloop_event_loop() -> asyncio.AbstractEventLoop:
    """A new instrumented uvloop loop.  Raises ImportError when uvloop is not installed."""
    import uvloop

    return instrument(uvloop.new_event_loop())


_policy_classes: dict[str, type[Any]] = {}


def policy_class() -> type[Any]:
    """The ``EventLoopPolicy`` class, built on first use so that importing loopscope never
    touches the policy API that Python 3.14 deprecates."""
    cls = _policy_classes.get("policy")
    if cls is not None:
        return cls
    base: type[Any] = (
        getattr(asyncio, "_DefaultEventLoopPolicy", None) or asyncio.DefaultEventLoopPolicy
    )

    class EventLoopPolicy(base):  # type: ignore[misc]
        """An event-loop policy whose loops are instrumented:
        ``asyncio.set_event_loop_policy(loopscope.EventLoopPolicy())``, or
        ``EventLoopPolicy(uvloop=True)`` for uvloop's loop."""

        def __init__(self, *, uvloop: bool = False) -> None:
            super().__init__()
            self.uvloop = uvloop

        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return new_uvloop_event_loop() if self.uvloop else new_event_loop()

    EventLoopPolicy.__module__ = "loopscope"
    _policy_classes["policy"] = EventLoopPolicy
    return EventLoopPolicy
