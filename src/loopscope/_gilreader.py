"""Where a loop is blocked inside a C call that holds the GIL, read while the call lasts.

The watchdog reads stacks with ``sys._current_frames()``, which needs the GIL; a loop thread
inside ``json.loads`` of a large body, a backtracking regular expression or a huge
``sorted()`` keeps it for the whole call, so the watchdog would only look once the call has
returned, by when the stack no longer shows it.  The C accelerator's GIL reader
(``_c/gilreader.h``) is armed whenever the watchdog is out of its wait, wanting the GIL:
when a loop thread then keeps the GIL for a few switch intervals without a switch (a thread
running bytecode gives it up within one of a request), a thread of the reader's own copies
that loop thread's frames without the GIL, and the watchdog turns the copies into stacks
(:func:`captures`) once it runs again.

This module is its one door, used whichever twin runs the hot path: the reader is native
and outside the per-step path, so only its presence matters.  Without the C accelerator,
on an interpreter whose frame layout it does not know, on another OS than Linux, or where
``process_vm_readv`` is refused (a seccomp sandbox), every function here does nothing and
such a block is seen only when the call has returned, as before.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, NamedTuple

__all__ = [
    "Capture",
    "arm",
    "captures",
    "configure",
    "disarm",
    "register",
    "registered",
    "status",
    "unregister",
]


class Capture(NamedTuple):
    """A loop thread's stack, read while it held the GIL."""

    #: Increases with every capture of the process.
    seq: int
    #: Start of the step that was running (the clock's seconds); 0.0 if it was not known.
    step_start: float
    #: When the stack was read (``time.monotonic()`` seconds).
    captured_at: float
    #: ``"path:lineno in function"`` entries, innermost last (as ``format_stack``).
    stack: list[str]


_NOT_LOADED: Any = object()
#: The native module, loaded on first use (importing loopscope loads no C code), or None.
_reader: Any = _NOT_LOADED


def _native() -> Any:
    global _reader
    if _reader is _NOT_LOADED:
        try:
            speedups = importlib.import_module(f"{__package__}._speedups")
        except ImportError:
            _reader = None
        else:
            _reader = getattr(speedups, "gil_reader", None)
    return _reader


#: Switch intervals the watchdog must have been kept from the GIL before the stacks are
#: read: a thread running bytecode gives the GIL up within about one.
GRACE_INTERVALS = 4


def status() -> str:
    """``"on"``, or why the reader is off here."""
    reader = _native()
    if reader is None:
        return "the C accelerator is not built"
    return str(reader.status())


def configure(first_report: float, stderr_reports: bool, file_rules: tuple[str, ...]) -> None:
    """The reader's settings: the age of a block (seconds) at which it is first reported
    on stderr, and then at twice... that age (at most a minute apart), whether it is, and
    which files are not the application's (for the line that report names)."""
    reader = _native()
    if reader is not None:
        grace = max(GRACE_INTERVALS * sys.getswitchinterval(), 0.01)
        reader.configure(grace, first_report, stderr_reports, file_rules)


def register(recorder: object, label: str) -> int:
    """Register the calling thread, which runs the loop of ``recorder``; a handle, or -1
    when the reader is off."""
    reader = _native()
    if reader is None:
        return -1
    return int(reader.register(recorder, label))


def unregister(handle: int) -> None:
    """The thread of ``handle`` is never read again once this returns."""
    if handle >= 0:
        _reader.unregister(handle)  # a handle comes from the loaded reader


def registered() -> int:
    """How many loop threads are registered now."""
    reader = _reader
    if reader is None or reader is _NOT_LOADED:
        return 0
    return int(reader.registered())


def captures(handle: int, after: int) -> list[Capture]:
    """The stacks of ``handle``'s thread read since capture ``after``, oldest first."""
    if handle < 0:
        return []
    return sorted(Capture(*item) for item in _reader.captures(handle, after))


def arm(wait: float) -> None:
    """The calling thread (the watchdog) will want the GIL back in ``wait`` seconds, and
    keeps wanting it until it waits again (:func:`disarm`, or another arm)."""
    if _reader is not None and _reader is not _NOT_LOADED:  # else nothing is registered
        _reader.arm(wait)


def disarm() -> None:
    """The watchdog waits without wanting the GIL (or stops)."""
    if _reader is not None and _reader is not _NOT_LOADED:
        _reader.disarm()
