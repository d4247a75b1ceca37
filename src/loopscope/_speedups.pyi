"""Types of the optional C accelerator (its sources: src/loopscope/_c/)."""

from collections.abc import Callable
from typing import Any, Literal, TypedDict, final

from ._stats import LoopStats

NBUCKETS: int

class ClockInfo(TypedDict):
    source: Literal["tsc", "clock_gettime"]
    calibrated: bool
    counter_hz: float
    anchors: int
    faults: int

def clock_info() -> ClockInfo: ...
def clock_now() -> float: ...
def watch_steps(sample_after: float, interval: float, timeout: float, /) -> bool: ...
def wake_watchers() -> None: ...
def _clock_skew(seconds: float, /) -> None: ...
def _clock_reset() -> None: ...

@final
class Recorder:
    probe: Any
    threshold: float
    native_clock: int
    busy_from_callbacks: int
    @property
    def watched(self) -> bool: ...
    def __init__(
        self,
        probe: Any,
        clock: Callable[[], float],
        threshold: float,
        busy_from_callbacks: bool,
        task_types: tuple[type[Any], ...],
        marker: str | None = ...,
    ) -> None: ...
    def flush(self, stats: LoopStats, /) -> None: ...
    def record(self, callback: object, ready: float, start: float, end: float, /) -> None: ...
    def record_io(self, callback: object, start: float, end: float, /) -> None: ...
    def now(self) -> float: ...
    def pending(self) -> bool: ...

@final
class TimedCallback:
    callback: Callable[..., object]
    ready: float
    probe: Any
    def __init__(
        self, callback: Callable[..., object], recorder: Recorder, ready: float
    ) -> None: ...
    def __call__(self, *args: Any) -> object: ...

@final
class Intercept:
    original: Callable[..., Any]
    fallback: Callable[..., Any]
    def __init__(
        self,
        kind: str,
        recorder: Recorder,
        original: Callable[..., Any],
        fallback: Callable[..., Any],
        loop_time: Callable[[], float] | None = ...,
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

@final
class CallSoon:
    fallback: Callable[..., Any]
    def __init__(
        self,
        recorder: Recorder,
        handle_class: type[Any],
        loop: Any,
        append: Callable[[Any], object],
        ready_attr: str,
        fallback: Callable[..., Any],
    ) -> None: ...
    def __call__(self, callback: Any, args: Any, context: Any, /) -> Any: ...

@final
class TimedRun:
    def __init__(
        self,
        recorder: Recorder,
        handle_run: Callable[[Any], None],
        ready_attr: str | None,
        cls: type[Any] | None = ...,
        report: Callable[[Any, BaseException], None] | None = ...,
    ) -> None: ...
    def __call__(self, handle: Any, /) -> None: ...
    def __get__(self, obj: Any, owner: Any = None) -> Any: ...
