"""The instrument interface: a base class whose methods receive loopscope's events.

An instrument is told about steps that blocked a loop.  Subclass :class:`Instrument`,
override the hooks you want, and pass an instance to ``install(instruments=[...])`` or
``Installation.add_instrument()``.  Only the hooks a subclass overrides are called; an
instrument whose hook raises is logged once (standard ``logging``, logger ``loopscope``)
and removed, and the error never reaches the loop or the application.

Which thread calls a hook:

- :meth:`Instrument.slow_step` runs on the loop's own thread, right after the slow step
  ended and before the loop runs its next callback: keep it short, as anything it does
  delays the loop (hand slow work, such as a network call, to another thread).
- :meth:`Instrument.loop_blocked` runs on loopscope's watchdog thread while the loop is
  still blocked (the loop's thread is busy in the step); it may run at the same time as
  code of the application.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

__all__ = ["HOOKS", "Instrument", "LoopBlocked", "SlowStep", "StepEvent", "overridden_hooks"]


@dataclass(frozen=True)
class StepEvent:
    """What every event about one step says.  Times are in seconds."""

    #: The event's name in logs: ``"slow_callback"`` or ``"loop_blocked"``.
    name: ClassVar[str] = ""

    #: The ``loop`` label of the loop (its thread's name unless ``loop_name`` is set).
    loop: str
    #: The slow threshold the step was measured against.
    threshold: float
    #: ``"task"`` for a step of an asyncio task, ``"callback"`` for any other callback
    #: (a ``call_soon``/``call_later`` callback, an I/O callback, a protocol method).
    kind: Literal["task", "callback"]
    #: The task's name, for a task step.
    task: str | None
    #: The qualified name of the task's coroutine, for a task step.
    coro: str | None
    #: What the callback is (its qualified name and where it was defined), for a callback.
    callback: str | None
    #: The application's line that was running, as ``"path:lineno in function"`` with the
    #: path relative to ``sys.path``; None when the step's stack was not taken (it ended
    #: before the watchdog looked) or has no frame of the application's.
    location: str | None
    #: The loop thread's stack taken while the step ran, ``"path:lineno in function"`` per
    #: frame, innermost last; empty when it was not taken.
    blocking_stack: tuple[str, ...]
    #: The stack shows the step importing a module (the import system's frames are on
    #: it): typically an application imported from inside the running loop at start-up.
    importing: bool
    #: When the step started, on ``time.monotonic()``'s clock: the same for every event
    #: about one step, so it tells the ``loop_blocked`` events of a step that then ended
    #: as a ``slow_callback`` apart from those of another step.
    started: float
    #: The wall-clock time (``time.time()``) the event was made.
    timestamp: float
    #: The name of the thread the event is delivered on: the loop's thread for a
    #: :class:`SlowStep`, the watchdog's (``loopscope-watchdog``) for a :class:`LoopBlocked`.
    thread: str

    def fields(self) -> dict[str, Any]:
        """The event's fields as a dict of plain values (the stack as a list)."""
        values = asdict(self)
        values["blocking_stack"] = list(self.blocking_stack)
        return values


@dataclass(frozen=True)
class SlowStep(StepEvent):
    """A step that ran for ``threshold`` seconds or longer has ended."""

    name: ClassVar[str] = "slow_callback"

    #: How long the step ran, in seconds.
    duration: float


@dataclass(frozen=True)
class LoopBlocked(StepEvent):
    """A step has been running for ``blocked_for`` seconds and is still running."""

    name: ClassVar[str] = "loop_blocked"

    #: How long the step has been running so far, in seconds.
    blocked_for: float


class Instrument:
    """Base class of instruments: every hook does nothing.  Override the ones you need.

    See the module's documentation for the thread each hook runs on.  A hook that raises
    is logged once and its instrument is removed.
    """

    __slots__ = ()

    def slow_step(self, event: SlowStep) -> None:
        """A step ran for the slow threshold or longer and has ended.  Called on the
        loop's thread, after the step, before the loop goes on."""

    def loop_blocked(self, event: LoopBlocked) -> None:
        """A step is still running long after the slow threshold (``loop_blocked_after``
        seconds, then at doubling intervals up to once a minute).  Called on the
        watchdog's thread while the loop is blocked."""


#: The hooks of :class:`Instrument`, by name.
HOOKS = ("slow_step", "loop_blocked")


def overridden_hooks(instrument: Instrument) -> tuple[str, ...]:
    """The hooks ``instrument``'s class overrides (the only ones worth calling)."""
    klass = type(instrument)
    return tuple(name for name in HOOKS if getattr(klass, name) is not getattr(Instrument, name))
