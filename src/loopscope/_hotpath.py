"""The hot path's one loader: the C accelerator, or its pure-Python twin.

Both twins have the same names, signatures and behaviour (``_speedups.pyi`` describes them;
tests/test_twins.py holds them to it).  The choice is made once, here, at import:
``LOOPSCOPE_PURE_PYTHON=1`` asks for the pure twin, and so does a C accelerator that is not
built or was built from other sources than this loopscope.  Nothing else in the package
asks which twin runs: a probe takes :data:`twin` when it is made.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

from . import _pure
from ._log import logger

__all__ = ["pure", "twin"]


#: The pure-Python twin (always importable).
pure: ModuleType = _pure


def load() -> ModuleType:
    """The C accelerator, or the pure twin: the C one is not built, was built from other
    sources than these (a stale build left in a checkout), or LOOPSCOPE_PURE_PYTHON=1."""
    if os.environ.get("LOOPSCOPE_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes", "on"):
        return _pure
    name = f"{__package__}._speedups"
    try:
        _speedups = importlib.import_module(name)
    except ImportError as exc:
        if not (isinstance(exc, ModuleNotFoundError) and exc.name == name):
            # Built, but it cannot be loaded here: say why rather than slow down unseen.
            logger().warning(
                "loopscope: the C accelerator could not be loaded (%s); using the "
                "pure-Python hot path",
                exc,
            )
        return _pure
    if getattr(_speedups, "INTERFACE", None) != _pure.INTERFACE:
        logger().warning(
            "loopscope: the C accelerator %s was built from other sources than this "
            "loopscope (interface %r, expected %r); using the pure-Python hot path; "
            "rebuild it with `pip install .`",
            getattr(_speedups, "__file__", "?"),
            getattr(_speedups, "INTERFACE", None),
            _pure.INTERFACE,
        )
        return _pure
    return _speedups


if TYPE_CHECKING:
    # Type-checked against the interface's stub, whichever twin runs.
    from . import _speedups as twin
else:
    #: The twin in use: ``loopscope._speedups`` or ``loopscope._pure``.
    twin = load()
