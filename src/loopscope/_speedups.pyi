"""The hot path's interface: what ``loopscope._speedups`` (the C accelerator, sources in
``_c/``) and ``loopscope._pure`` (its pure-Python twin) both provide, with these names and
signatures.  ``_hotpath.twin`` is typed as this module; tests/test_twins.py fails when
either twin differs from it."""

import weakref
from collections.abc import Callable
from typing import Any, final

from ._pure.clock import ClockInfo
from ._stats import LoopStats

#: The interface's version (the C twin must have the pure twin's).
INTERFACE: int
#: Slots of a histogram: one per bucket bound, and +Inf.
NBUCKETS: int

def clock_info() -> ClockInfo: ...
def clock_now() -> float: ...
def watch_steps(sample_after: float, interval: float, timeout: float, /) -> bool: ...
def wake_watchers() -> None: ...
def _clock_skew(seconds: float, /) -> None: ...
def _clock_reset() -> None: ...

@final
class Recorder:
    probe: Any
    busy_from_callbacks: int
    current_start: float
    current_callback: object
    exemplar_floor: float
    chain_end: float
    @property
    def threshold(self) -> float: ...
    @property
    def watched(self) -> bool: ...
    def __init__(
        self,
        probe: Any,
        clock: Callable[[], float],
        threshold: float,
        busy_from_callbacks: bool,
        task_types: tuple[type[Any], ...],
    ) -> None: ...
    def flush(self, stats: LoopStats, /) -> None: ...
    def pending(self) -> bool: ...
    def record(self, callback: object, ready: float, start: float, end: float, /) -> None: ...
    def record_io(self, callback: object, start: float, end: float, /) -> None: ...

@final
class CreateTask:
    @property
    def create_task(self) -> Callable[..., Any]: ...
    def __init__(self, create_task: Callable[..., Any], recorder: Recorder) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

@final
class RunForever:
    @property
    def run_forever(self) -> Callable[..., Any]: ...
    def __init__(
        self, start: Callable[[], bool], run_forever: Callable[..., Any], stop: Callable[[], None]
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

@final
class ClassHook:
    # On the class made for one loop (_own_class): the C twin is a method descriptor.
    def __init__(self, value: Any, loop: object, base: type[Any], name: str) -> None: ...
    def __get__(self, obj: object, cls: type[Any] | None = None) -> Any: ...
    def __call__(self, obj: object, /, *args: Any, **kwargs: Any) -> Any: ...

@final
class TimedCallback:
    # repr(), str(), __self__, __qualname__ and __name__ are the callback's (getattr raises
    # AttributeError where the callback's does), so that uvloop describes the callback.
    @property
    def callback(self) -> Callable[..., object]: ...
    @property
    def ready(self) -> float: ...
    @property
    def probe(self) -> Any: ...
    def __init__(
        self, callback: Callable[..., object], recorder: Recorder, ready: float
    ) -> None: ...
    def __call__(self, *args: Any) -> object: ...

@final
class TimedIO:
    @property
    def callback(self) -> Callable[..., object] | None: ...
    @property
    def probe(self) -> Any: ...
    def __init__(
        self,
        callback: Callable[..., object],
        recorder: Recorder,
        instance: weakref.ref[Any] | None = None,
    ) -> None: ...
    def __call__(self, *args: Any) -> object: ...

@final
class Intercept:
    @property
    def original(self) -> Callable[..., Any]: ...
    @property
    def fallback(self) -> Callable[..., Any]: ...
    def __init__(
        self,
        kind: str,
        recorder: Recorder,
        original: Callable[..., Any],
        fallback: Callable[..., Any],
        loop_time: Callable[[], float] | None = None,
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

@final
class CallSoon:
    @property
    def fallback(self) -> Callable[..., Any]: ...
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
        cls: type[Any] | None = None,
    ) -> None: ...
    def __call__(self, handle: Any, /) -> None: ...
    def __get__(self, obj: Any, owner: Any = None) -> Any: ...

@final
class TimedPoller:
    @property
    def poller(self) -> Any: ...
    @property
    def waited(self) -> float: ...
    def __init__(self, poller: Any, recorder: Recorder) -> None: ...
    def poll(self, *args: Any, **kwargs: Any) -> Any: ...
    def control(self, *args: Any, **kwargs: Any) -> Any: ...

@final
class Engine:
    @property
    def connections(self) -> int: ...
    def __init__(
        self,
        listener: int,
        wake: int,
        respond: Callable[[bytes | None], tuple[bytes, float]],
        timeout: float,
        max_connections: int,
        max_head: int,
    ) -> None: ...
    def run(self) -> None: ...
    def stop(self) -> None: ...
    def close_all(self) -> None: ...
