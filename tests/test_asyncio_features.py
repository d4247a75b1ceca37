"""Task factories and newer asyncio features, on asyncio's loop and on uvloop.

Eager tasks (3.12+): the first step of an eager task runs synchronously inside
``create_task``, that is inside the step of the task that creates it.  loopscope times it as
part of that step (the creator's callback duration includes it, and a slow eager first
step makes the creator's step slow) and does not count it as a task step of its own; the
task is counted in ``asyncio_tasks_created_total``, and its later steps, scheduled through
the loop, are timed and counted like any other.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import loopscope

from .conftest import make_loop, sample

Run = Callable[[Callable[[], Awaitable[Any]]], Any]
LOOP = {"loop": "MainThread"}
STEPS = "asyncio_loop_task_steps_total"
SLOW = "asyncio_loop_slow_callbacks_total"
CREATED = "asyncio_tasks_created_total"

needs_eager = pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
needs_311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="TaskGroup/timeout are 3.11+")


@pytest.fixture(autouse=True)
def _install(registry: CollectorRegistry) -> None:
    # Well under the 0.3 s blocking steps below, well over any other step on a busy machine.
    loopscope.install(registry=registry, slow_threshold=0.25, events="off")


def eager_factory(loop: Any, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
    """An eager task factory that accepts whatever a loop passes (uvloop passes
    ``eager_start=None`` on 3.12+, which ``asyncio.eager_task_factory`` rejects on 3.13)."""
    kwargs.pop("eager_start", None)
    return asyncio.Task(coro, loop=loop, eager_start=True, **kwargs)  # type: ignore[call-arg]


@needs_eager
class TestEagerTasks:
    """An eager task's first step belongs to its creator's step."""

    def test_first_step_inside_creator(self, run: Run, registry: CollectorRegistry) -> None:
        """A blocking eager first step makes the creator's step slow, and is not a step."""
        seen: dict[str, float] = {}

        async def child() -> None:
            time.sleep(0.3)  # runs inside create_task, before it returns
            await asyncio.sleep(0)

        async def main() -> None:
            asyncio.get_running_loop().set_task_factory(eager_factory)
            seen["steps"] = sample(registry, STEPS, **LOOP)
            seen["slow"] = sample(registry, SLOW, **LOOP)
            seen["created"] = sample(registry, CREATED, **LOOP)
            task = asyncio.create_task(child())
            assert not task.done()
            await task
            # main's first step (with child's eager step inside) and child's second step.
            assert sample(registry, STEPS, **LOOP) - seen["steps"] == 2
            assert sample(registry, SLOW, **LOOP) - seen["slow"] == 1
            assert sample(registry, CREATED, **LOOP) - seen["created"] == 1

        run(main)

    def test_completes_eagerly(self, run: Run, registry: CollectorRegistry) -> None:
        """A task that finishes in its eager step is created but never scheduled."""

        async def child() -> int:
            return 7

        async def main() -> None:
            asyncio.get_running_loop().set_task_factory(eager_factory)
            before = sample(registry, STEPS, **LOOP)
            task = asyncio.create_task(child())
            assert task.done() and task.result() == 7
            await asyncio.sleep(0)
            assert sample(registry, STEPS, **LOOP) - before == 1  # main's own step only

        run(main)

    def test_stdlib_factory_behaves_as_without(self, loop_kind: str) -> None:
        """asyncio.eager_task_factory gives the same outcome with and without loopscope
        (uvloop on 3.13 passes eager_start, which that factory rejects, either way)."""
        factory = asyncio.eager_task_factory  # type: ignore[attr-defined]
        with_loopscope = _create_task_outcome(loop_kind, factory, {})
        loopscope.uninstall()
        assert _create_task_outcome(loop_kind, factory, {}) == with_loopscope


async def _returns_one() -> int:
    return 1


def _create_task_outcome(loop_kind: str, factory: Any, kwargs: dict[str, Any]) -> str:
    """What ``loop.create_task(coro, **kwargs)`` does under ``factory`` on a new loop."""
    loop = make_loop(loop_kind)
    try:

        async def main() -> str:
            running = asyncio.get_running_loop()
            if factory is not None:
                running.set_task_factory(factory)
            coro = _returns_one()
            try:
                task = running.create_task(coro, **kwargs)
            except TypeError as exc:
                coro.close()
                return f"TypeError: {exc}"
            finally:
                running.set_task_factory(None)
            done = task.done()
            return f"done={done} result={await task}"

        return loop.run_until_complete(main())
    finally:
        loop.close()


class TestCustomTaskFactories:
    """Task factories set by the application keep working and are measured."""

    def test_factory_with_task_subclass(self, run: Run, registry: CollectorRegistry) -> None:
        """Keyword arguments reach the factory; steps of a Task subclass are counted."""
        received: list[dict[str, Any]] = []
        var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="")

        class MyTask(asyncio.Task):  # type: ignore[type-arg]
            pass

        def factory(loop: Any, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            received.append(dict(kwargs))
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            return MyTask(coro, loop=loop, **kwargs)

        async def child() -> str:
            await asyncio.sleep(0)
            return var.get()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.set_task_factory(factory)
            before = sample(registry, STEPS, **LOOP)
            extra: dict[str, Any] = {}
            if sys.version_info >= (3, 11):
                extra["context"] = contextvars.copy_context()
                extra["context"].run(var.set, "inside")
            else:
                var.set("inside")
            task = loop.create_task(child(), name="mine", **extra)
            assert isinstance(task, MyTask) and task.get_name() == "mine"
            assert await task == "inside"
            # main's first step and the child's two.
            assert sample(registry, STEPS, **LOOP) - before == 3

        run(main)
        assert received[0].get("name", "mine") == "mine"

    @needs_eager
    def test_eager_start_argument(self, loop_kind: str) -> None:
        """create_task(..., eager_start=True) does what the loop does without loopscope
        (runs eagerly, is ignored or is rejected, depending on the loop and version)."""
        with_loopscope = _create_task_outcome(loop_kind, None, {"eager_start": True})
        loopscope.uninstall()
        assert _create_task_outcome(loop_kind, None, {"eager_start": True}) == with_loopscope


@needs_311
class TestStructuredConcurrency:
    """TaskGroup and asyncio.timeout behave as without loopscope."""

    def test_task_group(self, run: Run, registry: CollectorRegistry) -> None:
        """Every task of a group is counted; a failure arrives as the same exception."""
        error = ValueError("bad")

        async def ok() -> None:
            await asyncio.sleep(0)

        async def bad() -> None:
            await asyncio.sleep(0)
            raise error

        async def main() -> None:
            before = sample(registry, CREATED, **LOOP)
            async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
                for _ in range(5):
                    group.create_task(ok())
            assert sample(registry, CREATED, **LOOP) - before == 5
            with pytest.raises(BaseException) as caught:
                async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
                    group.create_task(bad())
                    group.create_task(ok())
            assert caught.value.exceptions == (error,)  # type: ignore[attr-defined]

        run(main)

    def test_timeout(self, run: Run, registry: CollectorRegistry) -> None:
        """A timeout fires, can be rescheduled, and leaves no task behind."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.01):  # type: ignore[attr-defined]
                    await asyncio.sleep(5)
            async with asyncio.timeout(None) as cm:  # type: ignore[attr-defined]
                cm.reschedule(loop.time() + 5)
                await asyncio.sleep(0.01)
            assert not cm.expired()
            async with asyncio.timeout(0.01) as cm:  # type: ignore[attr-defined]
                cm.reschedule(None)
                await asyncio.sleep(0.03)
            assert sample(registry, "asyncio_tasks", **LOOP) == 1  # main itself

        run(main)
