"""install(), uninstall() and the explicit routes to an instrumented loop."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import pytest
import uvloop
from prometheus_client import CollectorRegistry

import loopscope
from loopscope import _installation

from .conftest import loop_class, make_loop, patched_names, sample

STEPS = "asyncio_loop_task_steps_total"


async def _three_steps() -> None:
    for _ in range(2):
        await asyncio.sleep(0)


class TestInstallBeforeLoops:
    """install() at the top of main.py reaches every loop created afterwards."""

    def test_asyncio_run(self, registry: CollectorRegistry) -> None:
        """asyncio.run() creates an instrumented loop."""
        loopscope.install(registry=registry)
        asyncio.run(_three_steps())
        assert sample(registry, STEPS, loop="MainThread") >= 3

    @pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is new in 3.11")
    def test_asyncio_runner(self, registry: CollectorRegistry) -> None:
        """asyncio.Runner creates an instrumented loop."""
        loopscope.install(registry=registry)
        with asyncio.Runner() as runner:
            runner.run(_three_steps())
        assert sample(registry, STEPS, loop="MainThread") >= 3

    def test_new_event_loop(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """asyncio.new_event_loop() and uvloop.new_event_loop() loops are instrumented."""
        loopscope.install(registry=registry)
        loop = make_loop(loop_kind)
        try:
            loop.run_until_complete(_three_steps())
        finally:
            loop.close()
        assert sample(registry, STEPS, loop="MainThread") >= 3
        info = registry.get_sample_value(
            "asyncio_loop_info",
            {
                "loop": "MainThread",
                "implementation": loop_kind,
                "python_version": ".".join(map(str, sys.version_info[:3])),
            },
        )
        assert info == 1.0

    def test_uvloop_run(self, registry: CollectorRegistry) -> None:
        """uvloop.run() creates an instrumented loop."""
        loopscope.install(registry=registry)
        uvloop.run(_three_steps())
        assert sample(registry, STEPS, loop="MainThread") >= 3


class TestInstallInsideRunningLoop:
    """install() from a lifespan or on_startup instruments the loop that is running."""

    def test_running_loop_is_instrumented(
        self, registry: CollectorRegistry, loop_kind: str
    ) -> None:
        """Steps after install() are counted, the ones before are not."""
        loop = make_loop(loop_kind)

        async def main() -> float:
            await _three_steps()
            loopscope.install(registry=registry)
            before = sample(registry, STEPS, loop="MainThread")
            await _three_steps()
            await asyncio.sleep(0.05)
            return before

        try:
            before = loop.run_until_complete(main())
        finally:
            loop.close()
        assert before == 0
        assert sample(registry, STEPS, loop="MainThread") >= 3
        assert sample(registry, "asyncio_loop_lag_seconds_count", loop="MainThread") >= 1


class TestInstallTwiceAndUninstall:
    """install() is idempotent and uninstall() restores everything."""

    def test_second_install_returns_same(self, registry: CollectorRegistry) -> None:
        """A second install() keeps the first installation."""
        first = loopscope.install(registry=registry)
        second = loopscope.install(registry=registry)
        assert first is second
        asyncio.run(_three_steps())
        assert sample(registry, STEPS, loop="MainThread") >= 3

    def test_second_install_warns_only_on_other_options(self, registry: CollectorRegistry) -> None:
        """A plain install() after install(port=0) asks for nothing else and logs nothing; one
        with another slow_threshold logs one warning naming that option."""
        from structlog.testing import capture_logs

        loopscope.install(registry=registry, port=0)
        with capture_logs() as logs:
            loopscope.install()
            loopscope.install(port=0)
        assert logs == []
        with capture_logs() as logs:
            loopscope.install(slow_threshold=0.5)
        assert [(e["event"], e["options"]) for e in logs] == [
            ("loopscope_already_installed", ["slow_threshold"])
        ]

    def test_uninstall_restores(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """Constructors, loop attributes and the registry are as they were."""
        asyncio_init = asyncio.BaseEventLoop.__dict__["__init__"]
        uvloop_had_init = "__init__" in uvloop.Loop.__dict__
        loopscope.install(registry=registry)
        loop = make_loop(loop_kind)
        assert {"call_soon", "_call_soon"} & patched_names(loop, loop_kind)
        loopscope.uninstall()
        try:
            assert asyncio.BaseEventLoop.__dict__["__init__"] is asyncio_init
            assert ("__init__" in uvloop.Loop.__dict__) == uvloop_had_init
            assert type(loop) is loop_class(loop_kind)
            assert not {"call_soon", "_call_soon", "call_at", "call_later", "run_forever"} & set(
                loop.__dict__
            )
            assert registry.get_sample_value("asyncio_loop_info", {}) is None
            assert list(registry.collect()) == []
            loop.run_until_complete(_three_steps())
        finally:
            loop.close()
        assert _installation.current() is None

    def test_application_attributes_kept(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """A loop method the application replaced on the instance before install() is the
        one loopscope's hook calls, and it is back in place after uninstall()."""
        loop = make_loop(loop_kind)
        made: list[str] = []
        original = loop.create_task

        def create_task(coro: Any, **kwargs: Any) -> Any:
            made.append(coro.__name__)
            return original(coro, **kwargs)

        loop.create_task = create_task  # type: ignore[method-assign]

        async def main() -> None:
            loopscope.install(registry=registry)
            assert loop.create_task is not create_task  # instrumented
            await loop.create_task(_three_steps())
            loopscope.uninstall()
            assert loop.create_task is create_task
            await loop.create_task(_three_steps())

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
        # main() itself went through it too, made by run_until_complete().
        assert made == ["main", "_three_steps", "_three_steps"]

    def test_context_manager(self, registry: CollectorRegistry, loop_kind: str) -> None:
        """``with loopscope.install():`` uninstalls on exit."""
        with loopscope.install(registry=registry):
            loop = make_loop(loop_kind)
            loop.run_until_complete(_three_steps())
            loop.close()
            assert sample(registry, STEPS, loop="MainThread") >= 3
        assert _installation.current() is None
        assert list(registry.collect()) == []

    def test_uninstall_while_loop_runs_in_thread(
        self, registry: CollectorRegistry, loop_kind: str
    ) -> None:
        """uninstall() from another thread while a loop runs neither breaks nor hangs it."""
        loopscope.install(registry=registry)
        loop = make_loop(loop_kind)
        started = threading.Event()

        async def main() -> int:
            started.set()
            total = 0
            for _ in range(200):
                await asyncio.sleep(0.001)
                total += 1
            return total

        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(loop.run_until_complete(main())))
        thread.start()
        assert started.wait(5)
        loopscope.uninstall()
        thread.join(10)
        loop.close()
        assert result == [200]


class TestExplicitRoutes:
    """Loop factories and the policy class give instrumented loops without install()."""

    @pytest.mark.skipif(sys.version_info < (3, 12), reason="loop_factory is new in 3.12")
    @pytest.mark.parametrize("factory", [loopscope.new_event_loop, loopscope.new_uvloop_event_loop])
    def test_asyncio_run_loop_factory(self, factory: object) -> None:
        """asyncio.run(main, loop_factory=...) measures the loop."""
        asyncio.run(_three_steps(), loop_factory=factory)  # type: ignore[call-arg]
        installation = _installation.current()
        assert installation is not None
        registry = installation.options.registry
        assert sample(registry, STEPS, loop="MainThread") >= 3

    @pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is new in 3.11")
    @pytest.mark.parametrize(
        ("factory", "kind"),
        [(loopscope.new_event_loop, "asyncio"), (loopscope.new_uvloop_event_loop, "uvloop")],
    )
    def test_runner_loop_factory(self, factory: object, kind: str, registry: object) -> None:
        """asyncio.Runner(loop_factory=...) measures a loop of the right kind."""
        loopscope.install(registry=registry)
        with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[arg-type]
            runner.run(_three_steps())
        assert sample(registry, STEPS, loop="MainThread") >= 3  # type: ignore[arg-type]
        assert (
            registry.get_sample_value(  # type: ignore[attr-defined]
                "asyncio_loop_info",
                {
                    "loop": "MainThread",
                    "implementation": kind,
                    "python_version": ".".join(map(str, sys.version_info[:3])),
                },
            )
            == 1.0
        )

    @pytest.mark.skipif(sys.version_info >= (3, 14), reason="policies are deprecated in 3.14")
    @pytest.mark.parametrize("use_uvloop", [False, True])
    def test_policy(self, registry: CollectorRegistry, use_uvloop: bool) -> None:
        """asyncio.set_event_loop_policy(loopscope.EventLoopPolicy()) works."""
        loopscope.install(registry=registry)
        loopscope.uninstall()  # keep only the explicit route
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(loopscope.EventLoopPolicy(uvloop=use_uvloop))
        try:
            loop = asyncio.new_event_loop()
            assert isinstance(loop, uvloop.Loop) == use_uvloop
            loop.run_until_complete(_three_steps())
            loop.close()
        finally:
            asyncio.set_event_loop_policy(previous)
        installation = _installation.current()
        assert installation is not None
        assert sample(installation.options.registry, STEPS, loop="MainThread") >= 3
