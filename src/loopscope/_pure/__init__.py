"""The pure-Python twin of the C accelerator (``loopscope._speedups``).

The same names, with the same signatures and behaviour, split by the same concerns as the
C sources under ``_c/``: the recorder, the interception of asyncio's loop and of uvloop,
the watchdog's wait, the clock and the /metrics engine.  ``loopscope._hotpath`` picks one
of the two twins; nothing else in the package asks which one runs.
"""

from .._stats import BUCKETS
from .asyncio_hooks import CallSoon, TimedPoller, TimedRun
from .classhook import ClassHook
from .clock import _clock_reset, _clock_skew, clock_info, clock_now
from .endpoint import Engine
from .recorder import CreateTask, Recorder, RunForever
from .uvloop_hooks import Intercept, TimedCallback, TimedIO
from .watch import wake_watchers, watch_steps

__all__ = [
    "INTERFACE",
    "NBUCKETS",
    "CallSoon",
    "ClassHook",
    "CreateTask",
    "Engine",
    "Intercept",
    "Recorder",
    "RunForever",
    "TimedCallback",
    "TimedIO",
    "TimedPoller",
    "TimedRun",
    "_clock_reset",
    "_clock_skew",
    "clock_info",
    "clock_now",
    "wake_watchers",
    "watch_steps",
]

#: The interface both twins implement (the C twin's INTERFACE must equal it).
INTERFACE = 9
#: Slots of a histogram: one per bucket bound, and +Inf.
NBUCKETS = len(BUCKETS) + 1
