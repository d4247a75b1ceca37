"""The pure-Python twin of ``_c/classhook.c``: a replaced method on the class made for one
loop (``_own_class``)."""

from __future__ import annotations

from typing import Any

__all__ = ["ClassHook"]


class ClassHook:
    """On the class made for one loop, in place of the method ``name`` of its class
    ``base``: ``loop`` finds ``value``; the class, and any other object of it, the method
    of ``base``.  (The C twin is a method descriptor, so that a method lookup followed by a
    call does not bind it; this one binds, with ``__get__``, as any Python object does.)"""

    __slots__ = ("_base", "_loop", "_name", "_value")

    def __init__(self, value: Any, loop: object, base: type[Any], name: str) -> None:
        if not isinstance(base, type):
            raise TypeError("ClassHook() argument 'base' must be type")
        if not isinstance(name, str):
            raise TypeError("ClassHook() argument 'name' must be str")
        self._value = value
        self._loop = loop
        self._base = base
        self._name = name

    def __get__(self, obj: object, cls: type[Any] | None = None) -> Any:
        if obj is not None and obj is self._loop:
            return self._value
        return self._attribute(obj, cls)

    def __call__(self, obj: object, /, *args: Any, **kwargs: Any) -> Any:
        if obj is self._loop:
            return self._value(*args, **kwargs)
        return self._attribute(obj, type(obj))(*args, **kwargs)

    def _attribute(self, obj: object, cls: type[Any] | None) -> Any:
        """The base class's own ``name`` as ``obj`` (None: the class) finds it."""
        for klass in self._base.__mro__:
            if self._name in vars(klass):
                attribute = vars(klass)[self._name]
                get = getattr(type(attribute), "__get__", None)
                return attribute if get is None else get(attribute, obj, cls)
        raise AttributeError(f"type object {self._base.__name__!r} has no attribute {self._name!r}")

    def __repr__(self) -> str:
        return f"<loopscope {self._name} of one {self._base.__qualname__}: {self._value!r}>"
