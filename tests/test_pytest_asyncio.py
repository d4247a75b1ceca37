"""install() from inside async code run by pytest-asyncio, on both loops (the loop
factories come from the pytest_asyncio_loop_factories hook in conftest.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop
from prometheus_client import CollectorRegistry

import loopscope

from .conftest import sample


class TestLifespanStyle:
    """What a FastAPI lifespan or aiohttp on_startup does."""

    @pytest.mark.asyncio
    async def test_install_in_running_loop(self, registry: CollectorRegistry) -> None:
        """install() inside the test's running loop measures its later steps and blocks."""
        loopscope.install(registry=registry, slow_threshold=0.05)
        loop = asyncio.get_running_loop()
        for _ in range(10):
            await asyncio.sleep(0)
        time.sleep(0.06)
        await asyncio.sleep(0.03)
        label = {"loop": "MainThread"}
        # Steps 1 to 10 after the one that called install(); the current one is still running.
        assert sample(registry, "asyncio_loop_task_steps_total", **label) == 10
        assert sample(registry, "asyncio_loop_slow_callbacks_total", **label) == 1
        assert sample(registry, "asyncio_loop_lag_seconds_count", **label) >= 1
        kind = "uvloop" if isinstance(loop, uvloop.Loop) else "asyncio"
        infos = [
            s.labels["implementation"]
            for f in registry.collect()
            if f.name == "asyncio_loop_info"
            for s in f.samples
        ]
        assert infos == [kind]
