"""Where a probe puts the loop methods it replaces: a class of the loop's own (see
``loopscope._own_class``), or the loop itself where that class can't be made or would be
hidden; either way the loop is measured, reads as before, and gets its own back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import loopscope

from .conftest import loop_class, make_loop, patched_names, sample

pytestmark = pytest.mark.usefixtures("fresh")

#: Where each kind of loop gets the methods: uvloop's on a class of its own (asyncio's C
#: task calls them from C), asyncio's on the loop (its own Python code calls them).
ON_OWN_CLASS = {"uvloop": True, "asyncio": False}


@pytest.fixture(name="fresh")
def fixture_fresh() -> Iterator[None]:
    loopscope.uninstall()
    yield
    loopscope.uninstall()


async def _steps(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _run_steps(loop: asyncio.AbstractEventLoop, n: int = 20) -> None:
    loop.run_until_complete(loop.create_task(_steps(n)))


def test_the_loop_reads_as_before(registry: CollectorRegistry, loop_kind: str) -> None:
    """Name, module, qualified name, repr() and isinstance() are the loop's class's; the
    loop's own attributes hold nothing of loopscope's where the class takes them."""
    plain = make_loop(loop_kind)
    plain_repr = repr(plain).replace(hex(id(plain)), "")
    plain.close()
    loopscope.install(registry=registry)
    loop = make_loop(loop_kind)
    try:
        cls, base = type(loop), loop_class(loop_kind)
        assert isinstance(loop, base)
        assert (cls.__name__, cls.__module__, cls.__qualname__) == (
            base.__name__,
            base.__module__,
            base.__qualname__,
        )
        assert repr(loop).replace(hex(id(loop)), "") == plain_repr
        hooked = {"create_task", "run_forever", "close"}
        assert hooked <= patched_names(loop, loop_kind)
        if ON_OWN_CLASS[loop_kind]:
            assert cls is not base and cls.__bases__ == (base,)
            assert not hooked & set(vars(loop))
        else:
            assert cls is base and hooked <= set(vars(loop))
        _run_steps(loop)
        assert sample(registry, "asyncio_loop_task_steps_total", loop="MainThread") >= 20
    finally:
        loop.close()
    loopscope.uninstall()
    assert type(loop) is loop_class(loop_kind)
    assert not {"create_task", "run_forever", "close", "call_soon", "_call_soon"} & set(vars(loop))


def test_each_loop_has_its_own(registry: CollectorRegistry, loop_kind: str) -> None:
    """Two loops: each is measured under its own label; the hooks of one are not the
    other's."""
    loopscope.install(registry=registry)
    first, second = make_loop(loop_kind), make_loop(loop_kind)
    try:
        assert (type(first) is not type(second)) == ON_OWN_CLASS[loop_kind]
        assert first.create_task is not second.create_task
        _run_steps(first, 10)
        _run_steps(second, 30)
    finally:
        first.close()
        second.close()
    steps = [
        value
        for metric in registry.collect()
        if metric.name == "asyncio_loop_task_steps"
        for s in metric.samples
        if s.name == "asyncio_loop_task_steps_total"
        for value in [s.value]
    ]
    assert sum(steps) == 42.0  # 10 + 1 and 30 + 1 steps


def test_a_method_the_loop_has_itself_is_replaced_on_the_loop(
    registry: CollectorRegistry, loop_kind: str
) -> None:
    """An application's own ``loop.create_task`` (an instance attribute, which a class's
    would not override) is measured, and is the loop's again after uninstall()."""
    loop = make_loop(loop_kind)
    created: list[Any] = []
    own = loop.create_task

    def counting(coro: Any, **kwargs: Any) -> Any:
        created.append(coro)
        return own(coro, **kwargs)

    loop.create_task = counting  # type: ignore[method-assign]
    loopscope.install(registry=registry)
    try:
        loopscope.instrument(loop)
        assert vars(loop)["create_task"] is not counting  # loopscope's, before the application's
        _run_steps(loop)
        assert len(created) == 1, "the application's create_task is no longer called"
        assert sample(registry, "asyncio_tasks_created_total", loop="MainThread") == 1
        assert sample(registry, "asyncio_loop_task_steps_total", loop="MainThread") >= 20
        loopscope.uninstall()
        assert vars(loop)["create_task"] is counting
        assert type(loop) is loop_class(loop_kind)
        _run_steps(loop)
        assert len(created) == 2
    finally:
        loop.close()


def _refusing_subclasses(loop_kind: str) -> type[asyncio.AbstractEventLoop]:
    """A loop class whose ``__init_subclass__`` fails: loopscope must not run it."""

    class Refusing(loop_class(loop_kind)):  # type: ignore[misc,valid-type]
        def __init_subclass__(cls, **kwargs: Any) -> None:
            raise AssertionError("loopscope made a subclass of a class with __init_subclass__")

    return Refusing


def test_a_class_with_init_subclass_keeps_the_methods_on_the_loop(
    registry: CollectorRegistry, loop_kind: str
) -> None:
    refusing = _refusing_subclasses(loop_kind)
    loopscope.install(registry=registry)
    loop = refusing()
    try:
        assert type(loop) is refusing
        assert {"create_task", "run_forever"} <= set(vars(loop))
        _run_steps(loop)
        assert sample(registry, "asyncio_loop_task_steps_total", loop="MainThread") >= 20
    finally:
        loop.close()
    loopscope.uninstall()
    assert not {"create_task", "run_forever", "call_soon", "_call_soon"} & set(vars(loop))


def test_another_tools_wrapper_put_on_later_survives_uninstall(
    registry: CollectorRegistry, loop_kind: str
) -> None:
    """A tool that wraps ``loop.create_task`` after loopscope keeps its wrapper through
    uninstall(), and the loop then runs its own method under it."""
    loopscope.install(registry=registry)
    loop = make_loop(loop_kind)
    created: list[Any] = []
    inner = loop.create_task

    def counting(coro: Any, **kwargs: Any) -> Any:
        created.append(coro)
        return inner(coro, **kwargs)

    loop.create_task = counting  # type: ignore[method-assign]
    try:
        _run_steps(loop)
        loopscope.uninstall()
        assert loop.create_task is counting
        _run_steps(loop)
        assert len(created) == 2
        assert type(loop) is loop_class(loop_kind)
    finally:
        loop.close()


def test_a_new_loop_of_the_loops_class_is_its_own(
    registry: CollectorRegistry, loop_kind: str
) -> None:
    """``type(loop)()`` (a pattern of programs that start a loop in a thread) makes a loop
    that runs its own tasks and closes itself, measured under its own hooks."""
    loopscope.install(registry=registry)
    first = make_loop(loop_kind)
    second = type(first)()
    try:
        assert isinstance(second, loop_class(loop_kind))
        task = second.create_task(_steps(5))
        assert task.get_loop() is second
        second.run_until_complete(task)
        assert first.create_task is not second.create_task
        second.close()
        assert second.is_closed() and not first.is_closed()
        _run_steps(first)
    finally:
        second.close()
        first.close()
    assert sample(registry, "asyncio_tasks_created_total", loop="MainThread") >= 2


def test_the_class_finds_the_loop_classs_own_methods(
    registry: CollectorRegistry, loop_kind: str
) -> None:
    """``type(loop).name`` is the loop class's own method, so ``type(loop).name(loop, ...)``
    works as without loopscope (unmeasured, as it was when the hooks were on the loop)."""
    loopscope.install(registry=registry)
    loop = make_loop(loop_kind)
    base = loop_class(loop_kind)
    try:
        for name in ("call_soon", "call_later", "create_task", "run_forever", "close"):
            assert getattr(type(loop), name) == getattr(base, name), name
        done: list[int] = []
        type(loop).call_soon(loop, done.append, 1)
        loop.run_until_complete(type(loop).create_task(loop, _steps(2)))
        assert done == [1]
    finally:
        type(loop).close(loop)
    assert loop.is_closed()


def test_every_shape_of_call_soon_runs_as_asked(
    registry: CollectorRegistry, loop_kind: str
) -> None:
    """call_soon with no argument, one, two, and with a context: each callback runs once,
    in order, with its arguments and in its context, and is measured."""
    import contextvars

    loopscope.install(registry=registry)
    loop = make_loop(loop_kind)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="outside")
    context = contextvars.copy_context()
    context.run(var.set, "inside")
    seen: list[object] = []
    try:
        loop.call_soon(seen.append, "one")
        loop.call_soon(lambda: seen.append("none"))
        loop.call_soon(lambda a, b: seen.append((a, b)), 1, 2)
        loop.call_soon(lambda a: seen.append((a, var.get())), "ctx", context=context)
        loop.call_soon(lambda: seen.append(var.get()), context=context)
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert seen == ["one", "none", (1, 2), ("ctx", "inside"), "inside"]
    assert sample(registry, "asyncio_loop_callback_duration_seconds_count", loop="MainThread") >= 6


def test_a_class_hook_answers_its_loop_and_everything_else_apart() -> None:
    """The object put on the class made for one loop: that loop finds the replacement,
    however the method is reached (a method call, an attribute read, a call with the loop
    first, as asyncio's C task makes it from 3.12 on); any other object of the class, and
    the class itself, the method of the loop's class."""
    from loopscope import _hotpath

    class Base:
        def method(self, x: int) -> tuple[str, object, int]:
            return ("base", self, x)

    class Own(Base):
        pass

    mine, other = Own(), Own()

    def replacement(x: int) -> tuple[str, int]:
        return ("hook", x)

    hook = _hotpath.twin.ClassHook(replacement, mine, Base, "method")
    Own.method = hook  # type: ignore[method-assign]
    assert mine.method(1) == ("hook", 1)
    bound = mine.method
    assert bound is replacement
    assert other.method(2) == ("base", other, 2)
    assert Own.method is Base.method
    assert Own.method(other, 3) == ("base", other, 3)
    assert hook(mine, 4) == ("hook", 4)
    assert hook(other, 5) == ("base", other, 5)
    assert hook(other, x=6) == ("base", other, 6)
    with pytest.raises(TypeError):
        hook()
    missing = _hotpath.twin.ClassHook(replacement, mine, Base, "missing")
    assert missing.__get__(mine, Own) is replacement
    with pytest.raises(AttributeError, match="missing"):
        missing.__get__(other, Own)
    with pytest.raises(TypeError, match="must be type"):
        _hotpath.twin.ClassHook(replacement, mine, "Base", "method")
