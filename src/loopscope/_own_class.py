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
"""

from __future__ import annotations

from typing import Any


class _ForItsLoop:
    """A replaced method on the class made for one loop: that loop finds the replacement;
    the class itself, or any other object of it, the method the replacement stands for, as
    the loop's class has it.  (The C hot path's hooks do this themselves, in C: the lookup
    of ``call_soon`` that asyncio's C task makes for every step calls no Python code.)"""

    __slots__ = ("base", "loop", "name", "value")

    def __init__(self, value: object, loop: object, base: type[Any], name: str) -> None:
        self.value = value
        self.loop = loop
        self.base = base
        self.name = name

    def __get__(self, obj: object, cls: type[Any] | None = None) -> Any:
        if obj is not None and obj is self.loop:
            return self.value
        for klass in self.base.__mro__:
            if self.name in vars(klass):
                attribute = vars(klass)[self.name]
                get = getattr(type(attribute), "__get__", None)
                return attribute if get is None else get(attribute, obj, cls)
        raise AttributeError(self.name)


def _binds_itself(value: object) -> bool:
    """Whether ``value`` is a hook of the C hot path, whose ``__get__`` does what
    ``_ForItsLoop`` does."""
    kind = type(value)
    return kind.__module__ == "loopscope._speedups" and hasattr(kind, "__get__")


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
        self.own: type[Any] | None = own
        self.names: list[str] = []

    def put(self, loop: object, name: str, value: object) -> None:
        """Make ``value`` what ``loop.name`` finds, as an attribute of the loop itself
        would be (never bound to the loop); the class itself, and any other object of it,
        find the loop class's own ``name``."""
        own, base = self.own, self.base
        assert own is not None and base is not None
        setattr(own, name, value if _binds_itself(value) else _ForItsLoop(value, loop, base, name))
        self.names.append(name)

    def remove(self, loop: object) -> None:
        """Take everything put back off, and give the loop its class again.  A class set on
        the loop since (another tool's subclass of this one) stays, and finds the loop's own
        methods again through this one."""
        own, base = self.own, self.base
        if own is None or base is None:
            return
        self.own = self.base = None
        for name in self.names:
            if name in vars(own):
                delattr(own, name)
        self.names.clear()
        if type(loop) is own:
            loop.__class__ = base
