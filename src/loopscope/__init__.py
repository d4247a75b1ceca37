"""loopscope: production event-loop instrumentation for asyncio and uvloop.

``loopscope.install()`` at start-up measures every callback and task step of every event
loop in the process and exports the figures to Prometheus.

PYTEST_DONT_REWRITE: loopscope is a pytest plugin (``loopscope.pytest_plugin``) with no
assertions for pytest to rewrite, and ``loopscope run`` imports it before pytest starts; this
marker keeps pytest from warning that the plugin's package was imported too early, a warning
that stops pytest when warnings are errors (``filterwarnings = ["error"]``).
"""

from __future__ import annotations

from typing import Any as _Any

from ._apps import aiohttp_metrics_handler, metrics_asgi_app
from ._factories import new_event_loop, new_uvloop_event_loop
from ._factories import policy_class as _policy_class
from ._installation import Installation, install, instrument, uninstall
from ._instrument import Instrument, LoopBlocked, SlowStep, StepEvent
from ._options import ConfigError

__version__ = "0.1.0"

__all__ = (
    "ConfigError",
    "EventLoopPolicy",
    "Installation",
    "Instrument",
    "LoopBlocked",
    "SlowStep",
    "StepEvent",
    "aiohttp_metrics_handler",
    "install",
    "instrument",
    "metrics_asgi_app",
    "new_event_loop",
    "new_uvloop_event_loop",
    "uninstall",
)


def __getattr__(name: str) -> _Any:
    # Built lazily: the policy API is deprecated from Python 3.14 on.
    if name == "EventLoopPolicy":
        return _policy_class()
    raise AttributeError(f"module 'loopscope' has no attribute {name!r}")
