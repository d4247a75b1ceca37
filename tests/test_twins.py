"""The hot path's two twins have one interface: the C accelerator (``loopscope._speedups``)
and the pure-Python twin (``loopscope._pure``) provide the names of ``_speedups.pyi``, with
its signatures, and only the loader (``_hotpath``) asks which twin runs.

What each twin does with those names is compared in tests/test_twin_behaviour.py.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import inspect
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import loopscope
from loopscope import _hotpath, _pure
from loopscope._stats import LoopStats

PACKAGE = Path(loopscope.__file__).parent
STUB = PACKAGE / "_speedups.pyi"

#: (name, kind, has a default) per parameter.
Shape = tuple[tuple[str, str, bool], ...]


def _c_twin() -> ModuleType:
    try:
        return importlib.import_module("loopscope._speedups")
    except ImportError:
        pytest.skip("the C accelerator is not built here")


def _shape_of_stub(node: ast.FunctionDef) -> Shape:
    args = node.args
    out: list[tuple[str, str, bool]] = []
    positional = [*args.posonlyargs, *args.args]
    first_default = len(positional) - len(args.defaults)
    for i, arg in enumerate(positional):
        kind = "POSITIONAL_ONLY" if i < len(args.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append((arg.arg, kind, i >= first_default))
    if args.vararg is not None:
        out.append((args.vararg.arg, "VAR_POSITIONAL", False))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append((arg.arg, "KEYWORD_ONLY", default is not None))
    if args.kwarg is not None:
        out.append((args.kwarg.arg, "VAR_KEYWORD", False))
    return tuple(out)


def _shape(obj: Any) -> Shape:
    signature = inspect.signature(obj)
    return tuple(
        (p.name, p.kind.name, p.default is not inspect.Parameter.empty)
        for p in signature.parameters.values()
    )


class _Stub:
    """What the stub declares: module names, function shapes, class members and shapes."""

    def __init__(self) -> None:
        tree = ast.parse(STUB.read_text())
        self.functions: dict[str, Shape] = {}
        self.constants: set[str] = set()
        self.classes: dict[str, dict[str, Shape | None]] = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                self.functions[node.name] = _shape_of_stub(node)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                self.constants.add(node.target.id)
            elif isinstance(node, ast.ClassDef):
                members: dict[str, Shape | None] = {}
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members[item.target.id] = None
                    elif isinstance(item, ast.FunctionDef):
                        is_property = any(
                            isinstance(d, ast.Name) and d.id == "property"
                            for d in item.decorator_list
                        )
                        members[item.name] = None if is_property else _shape_of_stub(item)
                self.classes[node.name] = members

    def names(self) -> set[str]:
        return set(self.functions) | self.constants | set(self.classes)


STUB_DECLARES = _Stub()


def _module_names(module: ModuleType) -> set[str]:
    return {
        name
        for name in dir(module)
        if not (name.startswith("__") and name.endswith("__"))
        and not isinstance(getattr(module, name), ModuleType)
    }


class _Probe:
    """Just enough of a probe for the twins' constructors."""

    active = True

    def __init__(self) -> None:
        self.stats = LoopStats()


class _BothWaits:
    """A poller with both kinds of wait, so that its stand-in has both methods."""

    def poll(self, *args: Any) -> list[Any]:
        return []

    def control(self, *args: Any) -> list[Any]:
        return []


@contextlib.contextmanager
def _made(twin: ModuleType) -> Iterator[dict[str, Any]]:
    """One object made by each of the twin's constructors (the stub's classes)."""
    recorder = twin.Recorder(_Probe(), time.monotonic, 1.0, False, (asyncio.Task,))
    listener, wake = socket.socketpair()
    try:
        yield {
            "Recorder": recorder,
            "CreateTask": twin.CreateTask(print, recorder),
            "RunForever": twin.RunForever(bool, print, print),
            "ClassHook": twin.ClassHook(print, recorder, asyncio.AbstractEventLoop, "close"),
            "TimedCallback": twin.TimedCallback(print, recorder, 0.0),
            "TimedIO": twin.TimedIO(print, recorder),
            "Intercept": twin.Intercept("call_soon", recorder, print, print),
            "CallSoon": twin.CallSoon(recorder, asyncio.Handle, None, print, "_x", print),
            "TimedRun": twin.TimedRun(recorder, print, None),
            "TimedPoller": twin.TimedPoller(_BothWaits(), recorder),
            "Engine": twin.Engine(listener.fileno(), wake.fileno(), print, 5.0, 4, 64),
        }
    finally:
        listener.close()
        wake.close()


def test_pure_twin_exports_exactly_the_stubs_names() -> None:
    assert set(_pure.__all__) == STUB_DECLARES.names()
    assert STUB_DECLARES.names() <= _module_names(_pure)


def test_c_twin_has_exactly_the_stubs_names() -> None:
    c = _c_twin()
    assert _module_names(c) == STUB_DECLARES.names()
    assert c.INTERFACE == _pure.INTERFACE
    assert c.NBUCKETS == _pure.NBUCKETS


@pytest.mark.parametrize("twin_name", ["c", "pure"])
def test_made_objects_have_the_stubs_members(twin_name: str) -> None:
    """What each constructor makes has the stub's public attributes and methods, and no
    others; it is callable where the stub says so, and a method descriptor for TimedRun.
    (The pure twin makes some of them plain functions: see _pure/asyncio_hooks.py.)"""
    twin = _c_twin() if twin_name == "c" else _pure
    with _made(twin) as made:
        assert set(made) == set(STUB_DECLARES.classes)
        for name, members in STUB_DECLARES.classes.items():
            obj = made[name]
            public = {member for member in dir(obj) if not member.startswith("_")}
            assert public == {m for m in members if not m.startswith("_")}, name
            assert callable(obj) == ("__call__" in members), name
            assert hasattr(type(obj), "__get__") or "__get__" not in members, name


#: ``__call__`` of these forwards any arguments to the loop's own method, which decides
#: what it accepts; the others take exactly the stub's parameters.
FORWARDING = {"Intercept", "CreateTask", "RunForever", "ClassHook"}


@pytest.mark.parametrize("twin_name", ["c", "pure"])
def test_signatures_are_the_stubs(twin_name: str) -> None:
    """Every function, constructor and method of both twins takes the stub's parameters
    (names, kinds, defaults).  The C twin's come from its docstrings' text signatures; a
    C type's ``__call__`` has none to read (vectorcall), so calls are checked on the pure
    twin only."""
    twin = _c_twin() if twin_name == "c" else _pure
    for name, shape in STUB_DECLARES.functions.items():
        assert _shape(getattr(twin, name)) == shape, name
    with _made(twin) as made:
        for name, members in STUB_DECLARES.classes.items():
            for member, shape in members.items():
                if shape is None or member == "__get__":
                    continue
                if member == "__init__":
                    assert _shape(getattr(twin, name)) == shape[1:], f"{name}()"
                elif member == "__call__":
                    if twin_name == "pure" and name not in FORWARDING:
                        assert _shape(made[name]) == shape[1:], f"{name}.__call__"
                else:  # a bound method: without self
                    got = _shape(getattr(made[name], member))
                    assert got == shape[1:], f"{name}.{member}"


def test_the_stub_is_the_twin_mypy_sees() -> None:
    """``_hotpath.twin`` is typed as the stub's module, so mypy checks every use of the
    hot path against the interface."""
    source = (PACKAGE / "_hotpath.py").read_text()
    assert "from . import _speedups as twin" in source


TWIN_MODULES = {"_speedups", "_pure"}


def _names_a_twin(node: ast.AST) -> bool:
    """Whether ``node`` imports a twin, or reads the loader's pure twin to compare with."""
    if isinstance(node, ast.ImportFrom):
        module = (node.module or "").split(".")
        return bool(TWIN_MODULES & set(module)) or any(
            alias.name in TWIN_MODULES for alias in node.names
        )
    if isinstance(node, ast.Import):
        return any(TWIN_MODULES & set(alias.name.split(".")) for alias in node.names)
    if isinstance(node, ast.Attribute):
        return node.attr in TWIN_MODULES or (
            node.attr in ("pure", "load")
            and isinstance(node.value, ast.Name)
            and node.value.id == "_hotpath"
        )
    return isinstance(node, ast.Name) and node.id in TWIN_MODULES


def test_only_the_loader_asks_which_twin_runs() -> None:
    """Outside ``_hotpath`` and the twins themselves, no module imports a twin or compares
    against one: the rest of the package uses ``_hotpath.twin`` and nothing else."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "_pure" or relative.name == "_hotpath.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if _names_a_twin(node):
                offenders.append(f"{relative}:{getattr(node, 'lineno', '?')}")
    assert offenders == []


def test_the_loader_picks_one_twin() -> None:
    assert _hotpath.twin in (_pure, _hotpath.load())
