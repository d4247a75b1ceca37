"""A class of the loop's own, where its probe puts the methods it replaces.

A probe replaces some of a loop's methods (``call_soon``, ``create_task``, ``close``...).
Put on the loop itself, they are found by a lookup in the loop's own attributes; asyncio's
C task looks ``loop.call_soon`` up once per step.  Put on a subclass of the loop's class
made for that one loop, the same lookup is answered by CPython's type attribute cache, as
the loop's own method is.  Measured with callgrind (instructions per uvloop task step of
the storm in benchmarks/instructions.sh, and per aiohttp request in
benchmarks/http_icount.py, against the methods on the loop): 172 instructions less per
step on 3.12 and 130 on 3.11, where the HTTP service's requests went from +0.40% to -0.17%
against an uninstrumented server.

The subclass has the name, module, qualified name and documentation of the loop's class and
no slots of its own, so ``repr(loop)`` and ``isinstance()`` are as before and its instances
have the same layout; only ``type(loop)`` is another class, until the hooks are removed.  A
loop whose class cannot take a subclass this way (a class that is not a heap type, one with
another metaclass or an ``__init_subclass__``, which would run code of the application's)
keeps its methods on the instance.

Each method is put there as the hot path's ``ClassHook``: the loop finds the replacement,
anything else the method of the loop's class.  The C twin's is a method descriptor, as a
function is, so that asyncio's C task (from Python 3.12 on) and the interpreter call it
with the loop first rather than binding it on every lookup: about 45 instructions less
per uvloop task step on 3.12 and 3.13 than a descriptor that binds itself.
"""

from __future__ import annotations

import weakref
from typing import Any

from . import _hotpath


class OwnClass:
    """The subclass made for one loop, and what was put on it."""

    def __init__(self, loop: object) -> None:
        """Make the subclass and give it to ``loop``; TypeError when its class can't take one."""
        base = type(loop)
        if type(base) is not type or any("__init_subclass__" in vars(k) for k in base.__mro__[:-1]):
            raise TypeError(f"{base.__qualname__} can't take a subclass of its own")

        def __new__(cls: type[Any], *args: Any, **kwargs: Any) -> Any:
            # type(loop)() makes a new loop of the loop's own class, which gets a class of
            # its own if loopscope instruments it, not one that would find this loop's hooks.
            return base(*args, **kwargs)

        namespace = {
            "__slots__": (),
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "__new__": __new__,
        }
        own = type(base.__name__, (base,), namespace)
        loop.__class__ = own  # TypeError for a class that is not a heap type
        self.base: type[Any] | None = base
        # Weakly: the class holds the hooks, which refer to the loop, and the probe that
        # keeps this must not keep its loop alive.  The loop keeps its class.
        self.own_ref: weakref.ref[type[Any]] | None = weakref.ref(own)
        self.names: list[str] = []

    @property
    def own(self) -> type[Any] | None:
        """The subclass, while its loop lives and until :meth:`remove`."""
        return None if self.own_ref is None else self.own_ref()

    def put(self, loop: object, name: str, value: object) -> None:
        """Make ``value`` what ``loop.name`` finds, as an attribute of the loop itself
        would be (never bound to the loop); the class itself, and any other object of it,
        find the loop class's own ``name``."""
        own, base = self.own, self.base
        assert own is not None and base is not None
        setattr(own, name, _hotpath.twin.ClassHook(value, loop, base, name))
        self.names.append(name)

    def remove(self, loop: object) -> None:
        """Take everything put back off, and give the loop its class again.  A class set on
        the loop since (another tool's subclass of this one) stays, and finds the loop's own
        methods again through this one."""
        own, base = self.own, self.base
        if own is None or base is None:
            return
        self.own_ref = self.base = None
        for name in self.names:
            if name in vars(own):
                delattr(own, name)
        self.names.clear()
        if type(loop) is own:
            loop.__class__ = base
