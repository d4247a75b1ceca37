"""loopscope never changes the behaviour of the program it measures."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import loopscope
from loopscope import _installation

from .conftest import make_loop, sample

Run = Callable[[Callable[[], Awaitable[Any]]], Any]


@pytest.fixture(autouse=True)
def _install(registry: CollectorRegistry) -> None:
    loopscope.install(registry=registry)


class Boom(Exception):
    """An application error."""


class TestValuesAndErrors:
    """Results and exceptions reach the application unchanged."""

    def test_return_value(self, run: Run) -> None:
        """run_until_complete returns the coroutine's value."""

        async def main() -> tuple[int, str]:
            return 42, "x"

        assert run(main) == (42, "x")

    def test_task_exception_is_same_object(self, run: Run) -> None:
        """The exception a task raises is the very object the awaiter sees."""
        error = Boom("no")

        async def failing() -> None:
            await asyncio.sleep(0)
            raise error

        async def main() -> BaseException | None:
            try:
                await asyncio.create_task(failing())
            except Boom as caught:
                return caught
            return None

        assert run(main) is error

    def test_runaway_recursion_in_steps(self, run: Run) -> None:
        """A task step and a callback that recurse without end meet RecursionError, and the
        loop goes on."""
        caught: list[str] = []

        def dive(depth: int) -> int:
            return dive(depth + 1) + 1

        def callback(where: str) -> None:
            try:
                dive(0)
            except RecursionError:
                caught.append(where)

        async def step() -> None:
            await asyncio.sleep(0)
            callback("task step")

        async def main() -> str:
            loop = asyncio.get_running_loop()
            loop.call_soon(callback, "callback")
            await asyncio.create_task(step())
            return "after"

        assert run(main) == "after"
        assert sorted(caught) == ["callback", "task step"]

    def test_callback_exception_reaches_handler(self, run: Run, loop_kind: str) -> None:
        """A raising callback reaches the exception handler, which names the callback."""
        error = Boom("bad")
        contexts: list[dict[str, Any]] = []

        def exploding_callback() -> None:
            raise error

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda _loop, context: contexts.append(context))
            loop.call_soon(exploding_callback)
            loop.call_later(0.001, exploding_callback)
            await asyncio.sleep(0.02)

        run(main)
        assert len(contexts) == 2
        for context in contexts:
            assert context["exception"] is error
            assert "exploding_callback" in context["message"]
        # uvloop drops a timer's callback once it ran, so only the call_soon handle names it.
        # (On a loaded machine the 1 ms timer may run before the call_soon callback.)
        kinds = {type(c["handle"]).__name__: c["handle"] for c in contexts}
        assert set(kinds) == {"Handle", "TimerHandle"}
        assert "exploding_callback" in repr(kinds["Handle"])
        if loop_kind == "asyncio":
            assert "exploding_callback" in repr(kinds["TimerHandle"])


class TestHandles:
    """Handles keep their API."""

    def test_cancel(self, run: Run) -> None:
        """A cancelled callback or timer does not run."""
        ran: list[str] = []

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.call_soon(ran.append, "soon").cancel()
            loop.call_later(0.001, ran.append, "later").cancel()
            loop.call_soon_threadsafe(ran.append, "threadsafe").cancel()
            await asyncio.sleep(0.01)

        run(main)
        assert ran == []

    def test_timer_when(self, run: Run) -> None:
        """TimerHandle.when() is the time asked for."""

        async def main() -> tuple[float, float]:
            loop = asyncio.get_running_loop()
            when = loop.time() + 10
            handle = loop.call_at(when, lambda: None)
            handle.cancel()
            return when, handle.when()

        asked, got = run(main)
        assert got == pytest.approx(asked, abs=0.002)

    def test_handle_types(self, run: Run, loop_kind: str) -> None:
        """Handles are still asyncio.Handle and asyncio.TimerHandle where they were."""

        async def main() -> tuple[Any, Any]:
            loop = asyncio.get_running_loop()
            return loop.call_soon(lambda: None), loop.call_later(1, lambda: None)

        soon, later = run(main)
        if loop_kind == "asyncio":
            assert isinstance(soon, asyncio.Handle) and type(soon).__name__ == "Handle"
            assert isinstance(later, asyncio.TimerHandle)
            assert type(later).__name__ == "TimerHandle"
            assert repr(soon).startswith("<Handle ")


class TestArgumentsAndContext:
    """Arguments and contextvars reach the callback."""

    def test_positional_args(self, run: Run) -> None:
        """Positional arguments are passed in order."""
        got: list[tuple[Any, ...]] = []

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.call_soon(lambda *a: got.append(a), 1, "two", None)
            loop.call_later(0, lambda *a: got.append(a), 3)
            await asyncio.sleep(0.01)

        run(main)
        assert got == [(1, "two", None), (3,)]

    def test_contextvars(self, run: Run) -> None:
        """A callback runs in the context it was given."""
        var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
        seen: list[str] = []

        async def main() -> None:
            loop = asyncio.get_running_loop()
            context = contextvars.copy_context()
            context.run(var.set, "in-context")
            loop.call_soon(lambda: seen.append(var.get()), context=context)
            var.set("task")
            loop.call_soon(lambda: seen.append(var.get()))
            await asyncio.sleep(0.01)

        run(main)
        assert seen == ["in-context", "task"]

    def test_close(self, loop_kind: str) -> None:
        """close() closes the loop."""
        loop = make_loop(loop_kind)
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        assert loop.is_closed()
        with pytest.raises(RuntimeError):
            loop.call_soon(lambda: None)


class TestFaultsStayInside:
    """An error inside loopscope's bookkeeping never reaches the application."""

    def test_bookkeeping_error_is_logged_once(
        self,
        run: Run,
        registry: CollectorRegistry,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A failing measurement switches itself off; the program's results are intact."""

        class Broken:
            """A callback whose ``__self__`` fails: recording its step (both twins look for
            the task it belongs to) raises inside loopscope's bookkeeping."""

            @property
            def __self__(self) -> object:
                raise RuntimeError("bookkeeping bug")

            def __call__(self) -> None:
                pass

        async def main() -> int:
            asyncio.get_running_loop().call_soon(Broken())
            total = 0
            for i in range(50):
                await asyncio.sleep(0)
                total += i
            return total

        with caplog.at_level(logging.ERROR, logger="loopscope"):
            assert run(main) == sum(range(50))
            assert run(main) == sum(range(50))
        messages = [r for r in caplog.records if "bookkeeping" in str(r.exc_info)]
        assert len(messages) == 1

    def test_collector_error_does_not_break_scrape(
        self,
        registry: CollectorRegistry,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A collector fault yields an empty collection, logged once."""
        installation = _installation.current()
        assert installation is not None

        def broken() -> None:
            raise RuntimeError("collector bug")

        monkeypatch.setattr(installation.collector, "read", broken)
        with caplog.at_level(logging.ERROR, logger="loopscope"):
            assert list(installation.collector.collect()) == []
            assert list(installation.collector.collect()) == []
        assert len([r for r in caplog.records if "collector bug" in str(r.exc_info)]) == 1

    def test_structlog_processor_error(self, run: Run, registry: CollectorRegistry) -> None:
        """A structlog processor that raises turns events off; counting goes on."""
        import structlog

        def bad_processor(*_args: Any) -> Any:
            raise RuntimeError("processor bug")

        structlog.configure(processors=[bad_processor])
        try:

            async def main() -> str:
                time.sleep(0.12)
                await asyncio.sleep(0)
                time.sleep(0.12)
                return "ok"

            assert run(main) == "ok"
        finally:
            structlog.reset_defaults()
        assert sample(registry, "asyncio_loop_slow_callbacks_total", loop="MainThread") == 2
