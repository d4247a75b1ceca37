"""Readable names for callbacks and tasks, used only on the (rare) slow path."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

__all__ = ["TASK_TYPES", "describe_callback", "task_fields"]

_py_task = getattr(asyncio.tasks, "_PyTask", asyncio.Task)
#: Classes whose bound methods scheduled on the loop are task steps.
TASK_TYPES: tuple[type[Any], ...] = (
    (asyncio.Task,) if _py_task is asyncio.Task else (asyncio.Task, _py_task)
)


def describe_callback(callback: object) -> str:
    """A short description of a callback: its qualified name and where it was defined."""
    inner = callback
    while isinstance(inner, functools.partial):
        inner = inner.func
    name = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None)
    if not isinstance(name, str):
        return repr(callback)[:200]
    owner = getattr(inner, "__self__", None)
    if owner is not None and not isinstance(owner, type) and "." not in name:
        name = f"{type(owner).__qualname__}.{name}"
    code = getattr(getattr(inner, "__func__", inner), "__code__", None)
    if code is not None:
        return f"{name} ({code.co_filename}:{code.co_firstlineno})"
    return name


def task_fields(task: Any) -> dict[str, str]:
    """``task`` and ``coro`` fields for an event about one step of ``task``."""
    fields: dict[str, str] = {}
    try:
        fields["task"] = str(task.get_name())
    except Exception:
        fields["task"] = repr(task)[:200]
    coro = None
    with contextlib.suppress(Exception):
        coro = task.get_coro()
    if coro is not None:
        fields["coro"] = str(
            getattr(coro, "__qualname__", None) or getattr(coro, "__name__", None) or repr(coro)
        )
    return fields
