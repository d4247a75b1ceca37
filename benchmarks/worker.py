"""One measurement in a fresh process: ``python -m benchmarks.worker '<json spec>'``.

Every variant (the bare loop, loopscope, each peer) runs in its own interpreter so that no
patch one of them makes survives into the next measurement.  The result is one line,
``RESULT {...}``, on stdout.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

Spec = dict[str, Any]

#: What each variant measures (printed once under the table).
MEASURES = {
    "loopscope": "duration + schedule-delay histograms of every callback, lag, busy time, "
    "task steps, slow-step events with stacks, Prometheus export",
    "debug": "slow-callback log (>100 ms), un-awaited coroutines, source tracebacks",
    "aiodebug": "slow-callback log (Handle._run patched)",
    "aiocop": "slow-task callback, blocking-I/O detection through audit hooks",
    "pyleak": "blocking detection by a watcher thread (threshold 0.2 s)",
    "monitored-ioloop": "per-callback duration and loop lag handed to a callback",
}


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _noop_monitor(_state: object) -> None:
    return None


class Setup:
    """Prepares one variant: the loop it runs on and what wraps the measured coroutine."""

    def __init__(self, variant: str, kind: str) -> None:
        global TRACER
        self.variant = variant
        self.kind = kind
        self.info: dict[str, Any] = {}
        self.wrap: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None
        # "<variant>+trace": every task of the storm runs in a span of the OpenTelemetry SDK.
        if variant.endswith("+trace"):
            from opentelemetry.sdk.trace import TracerProvider

            TRACER = TracerProvider().get_tracer("benchmarks")
            variant = variant.removesuffix("+trace")
        if variant == "loopscope-no-otel":
            # As where opentelemetry-api is not installed: no exemplars are looked for.
            from loopscope import _probe

            _probe.tracing_installed = lambda: False  # type: ignore[assignment]
            variant = "loopscope"
        if variant in ("loopscope", "loopscope-pure"):
            from prometheus_client import CollectorRegistry

            import loopscope
            from loopscope import _hotpath

            self.info["path"] = "pure" if _hotpath.twin is _hotpath.pure else "C"
            loopscope.install(registry=CollectorRegistry())
        elif variant == "aiodebug":
            from aiodebug import log_slow_callbacks

            log_slow_callbacks.enable(0.1)
        if variant == "monitored-ioloop":
            if kind == "uvloop":
                from monitored_ioloop import monitored_uvloop_loop_factory as factory
            else:
                from monitored_ioloop import monitored_asyncio_loop_factory as factory
            self.loop = factory(_noop_monitor)()
        else:
            self.loop = _new_loop(kind)
        if variant == "debug":
            self.loop.set_debug(True)
        if variant == "aiocop":
            import aiocop

            async def arm() -> None:
                aiocop.patch_audit_functions()
                aiocop.start_blocking_io_detection()
                aiocop.detect_slow_tasks(threshold_ms=100, on_slow_task=_noop_monitor)
                aiocop.activate()

            self.loop.run_until_complete(arm())
        if variant == "pyleak":
            from pyleak import no_event_loop_blocking

            async def wrapped(coro: Awaitable[Any]) -> Any:
                async with no_event_loop_blocking(threshold=0.2):
                    return await coro

            self.wrap = wrapped

    def run(self, coro: Awaitable[Any]) -> Any:
        if self.wrap is not None:
            coro = self.wrap(coro)
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]


# --- workloads 1 and 2 -------------------------------------------------------------------


#: The tracer of the ``+trace`` variants (the OpenTelemetry SDK's), else None.
TRACER: Any = None
#: Seconds each step of the ms-step storm runs: just over loopscope's exemplar floor, so
#: that with tracing every step is offered for an exemplar.
MS_STEP = 0.0012


async def task_storm(tasks: int, steps: int) -> None:
    async def worker() -> None:
        for _ in range(steps):
            await asyncio.sleep(0)

    # Without tracing, the tasks are the storm's coroutines themselves, as they always were.
    await asyncio.gather(*(_traced(worker()) if TRACER else worker() for _ in range(tasks)))


async def _traced(coro: Awaitable[None]) -> None:
    with TRACER.start_as_current_span("task"):
        await coro


async def ms_step_storm(tasks: int, steps: int) -> None:
    """Tasks whose every step runs MS_STEP seconds (a busy wait)."""

    async def worker() -> None:
        for _ in range(steps):
            until = time.perf_counter() + MS_STEP
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)

    await asyncio.gather(*(_traced(worker()) if TRACER else worker() for _ in range(tasks)))


async def callback_storm(chains: int, length: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [chains]

    def step(n: int) -> None:
        if n:
            loop.call_soon(step, n - 1)
            return
        left[0] -= 1
        if left[0] == 0:
            done.set_result(None)

    for _ in range(chains):
        loop.call_soon(step, length)
    await done


async def timer_storm(chains: int, length: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [chains]

    def step(n: int) -> None:
        if n:
            loop.call_later(0.0, step, n - 1)
            return
        left[0] -= 1
        if left[0] == 0:
            done.set_result(None)

    for _ in range(chains):
        loop.call_later(0.0, step, length)
    await done


STORMS: dict[str, Callable[[int, int], Awaitable[None]]] = {
    "tasks": task_storm,
    "ms-steps": ms_step_storm,
    "callbacks": callback_storm,
    "timers": timer_storm,
}


def measure_storm(spec: Spec) -> dict[str, Any]:
    setup = Setup(spec["variant"], spec["loop"])
    storm = STORMS[spec["storm"]]
    width, length = spec["width"], spec["length"]
    budget = spec.get("budget", 2.0)
    warm = max(length // 10, 1)
    t0 = time.perf_counter()
    setup.run(storm(width, warm))  # warm-up
    projected = (time.perf_counter() - t0) * length / warm
    if projected > budget:  # a very slow variant (debug mode): fewer steps, same per-step cost
        length = max(int(length * budget / projected), 20)
    samples: list[float] = []
    began = time.perf_counter()
    gc.collect()
    wall: list[float] = []
    while len(samples) < spec["reps"]:
        # CPU time of the whole process (every thread, so a watcher thread's cost counts):
        # on a shared machine it is far steadier than wall time, which is also recorded.
        c0, t0 = time.process_time(), time.perf_counter()
        setup.run(storm(width, length))
        samples.append((time.process_time() - c0) / (width * length) * 1e9)
        wall.append((time.perf_counter() - t0) / (width * length) * 1e9)
        if time.perf_counter() - began > budget:
            break
    setup.loop.close()
    return {
        "length": length,
        "ns_per_step": statistics.median(samples),
        "wall_ns_per_step": statistics.median(wall),
        "samples": samples,
        **setup.info,
    }


def measure_paired(spec: Spec) -> dict[str, Any]:
    """The task-step storm on loops of one process, taken in turns: one made before
    loopscope.install() (uninstrumented), one on the C hooks and one on the pure-Python
    hooks.  A turn of each lasts tens of milliseconds, so every ratio compares runs a
    fraction of a second apart: drift on a shared machine (other tenants, clock speed)
    that moves whole processes minutes apart cancels out of it.  ``"peers"`` adds turns of
    the uninstrumented loop under a peer that can share the process: "pyleak" (a watcher
    thread, nothing global patched) and, on asyncio's loop, "aiodebug" (its patch of
    ``asyncio.Handle._run`` is put in place for its turns only).

    Two phases, each against its own uninstrumented turns: first the C loop (and the
    peers), then the pure-Python loop, made only then: a pure-Python loop makes loopscope's
    watchdog wait in Python, as it does in a process on the pure path, and the C loop is
    measured with the watchdog waiting in C, as in a process on the C path.  The CPU time
    of the watchdog thread during the other turns is taken out of theirs, so that it is
    charged to the loopscope turns alone."""
    from prometheus_client import CollectorRegistry

    import loopscope
    from loopscope import _hotpath

    kind, width, length = spec["loop"], spec["width"], spec["length"]
    workload = STORMS[spec.get("storm", "tasks")]
    loops = {"base": _new_loop(kind)}
    installation = loopscope.install(registry=CollectorRegistry())
    watchdog = installation.watchdog
    twin = _hotpath.twin
    loops["loopscope"] = _new_loop(kind)

    def make_pure_loop() -> None:
        _hotpath.twin = _hotpath.pure  # the next loop gets the pure-Python hooks
        try:
            loops["loopscope-pure"] = _new_loop(kind)
        finally:
            _hotpath.twin = twin

    peers = [
        peer
        for peer in spec.get("peers", [])
        if peer == "pyleak" or (peer == "aiodebug" and kind == "asyncio")
    ]
    own_run = asyncio.events.Handle._run
    aiodebug_run = own_run
    if "aiodebug" in peers:
        from aiodebug import log_slow_callbacks

        log_slow_callbacks.enable(0.1)
        aiodebug_run = asyncio.events.Handle._run
        asyncio.events.Handle._run = own_run  # type: ignore[method-assign]

    def storm(name: str, steps: int) -> None:
        if name == "aiodebug":
            asyncio.events.Handle._run = aiodebug_run  # type: ignore[method-assign]
            try:
                loops["base"].run_until_complete(workload(width, steps))
            finally:
                asyncio.events.Handle._run = own_run  # type: ignore[method-assign]
        elif name == "pyleak":
            from pyleak import no_event_loop_blocking

            async def watched() -> None:
                async with no_event_loop_blocking(threshold=0.2):
                    await workload(width, steps)

            loops["base"].run_until_complete(watched())
        else:
            loops[name].run_until_complete(workload(width, steps))

    thread = watchdog.thread
    assert thread is not None and thread.ident is not None
    watchdog_clock = time.pthread_getcpuclockid(thread.ident)

    def timed_turn(name: str, steps: int) -> float:
        c0, w0 = time.process_time(), time.clock_gettime(watchdog_clock)
        storm(name, steps)
        cpu = time.process_time() - c0
        if not name.startswith("loopscope"):
            cpu -= time.clock_gettime(watchdog_clock) - w0
        return cpu

    ns: dict[str, float] = {}
    ratios: dict[str, list[float]] = {}
    waits: dict[str, str] = {}
    for phase in (["base", "loopscope", *peers], ["base", "loopscope-pure"]):
        if "loopscope-pure" in phase:
            make_pure_loop()
        sees = getattr(watchdog, "_wait_sees_every_step", None)
        c_wait = sees is not None and sees(installation) and _hotpath.twin is not _hotpath.pure
        waits[phase[1]] = "C" if c_wait else "Python"
        for name in phase:  # warm-up
            timed_turn(name, max(length // 4, 1))
        gc.collect()
        times: dict[str, list[float]] = {name: [] for name in phase}
        for turn in range(spec["turns"]):
            k = turn % len(phase)
            for name in phase[k:] + phase[:k]:
                times[name].append(timed_turn(name, length) / (width * length) * 1e9)
        for name in phase[1:]:
            ns[name] = statistics.median(times[name])
            ratios[name] = [a / b for a, b in zip(times[name], times["base"], strict=True)]
        ns.setdefault("base", statistics.median(times["base"]))
    for loop in loops.values():
        loop.close()
    loopscope.uninstall()
    return {
        "path": "pure" if twin is _hotpath.pure else "C",
        "ns_per_step": ns,
        "ratios": ratios,
        "watchdog_wait": waits,
    }


# --- workload 5: accuracy -----------------------------------------------------------------


def measure_accuracy(spec: Spec) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry
    from structlog.testing import capture_logs

    import loopscope

    registry = CollectorRegistry()
    loopscope.install(registry=registry, slow_threshold=0.002, loop_name="accuracy")
    loop = _new_loop(spec["loop"])
    rows = []
    for block_ms in spec["blocks_ms"]:
        for _ in range(spec["reps"]):
            actual: list[float] = []

            def block(ms: float = block_ms, out: list[float] = actual) -> None:
                t0 = time.perf_counter()
                time.sleep(ms / 1000)
                out.append(time.perf_counter() - t0)

            def blocked() -> float:
                value = registry.get_sample_value(
                    "asyncio_loop_blocked_seconds_total", {"loop": "accuracy"}
                )
                return value or 0.0

            async def main() -> None:
                asyncio.get_running_loop().call_soon(block)
                await asyncio.sleep(0.001)

            before = blocked()
            with capture_logs() as logs:
                loop.run_until_complete(main())
            after = blocked()
            events = [e for e in logs if e.get("event") == "slow_callback"]
            rows.append(
                {
                    "block_ms": block_ms,
                    "actual_ms": actual[0] * 1000,
                    "counter_ms": (after - before) * 1000,
                    "event_ms": events[0]["duration"] * 1000 if events else None,
                }
            )
    loop.close()
    return {"rows": rows}


# --- workload 6: scrape cost and memory ---------------------------------------------------


def measure_scrape(spec: Spec) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest

    import loopscope

    registry = CollectorRegistry()
    loopscope.install(registry=registry)
    me = threading.current_thread()
    name = me.name
    loops = []
    for i in range(spec["loops"]):
        me.name = f"bench-loop-{i:03d}"
        loop = _new_loop(spec["loop"])
        loop.run_until_complete(task_storm(2, 5))
        loops.append(loop)
    me.name = name
    samples = []
    generate_latest(registry)
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        body = generate_latest(registry)
        samples.append((time.perf_counter() - t0) * 1e6)
    for loop in loops:
        loop.close()
    return {"us": statistics.median(samples), "bytes": len(body)}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure_memory(spec: Spec) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    import loopscope

    loopscope.install(registry=CollectorRegistry())
    loop = _new_loop(spec["loop"])
    batches, per_batch = spec["batches"], spec["per_batch"]
    rss = []
    for _ in range(batches):
        loop.run_until_complete(callback_storm(100, per_batch // 100))
        gc.collect()
        rss.append(_rss_kib())
    loop.close()
    return {"rss_kib": rss, "callbacks": batches * per_batch}


MEASUREMENTS: dict[str, Callable[[Spec], dict[str, Any]]] = {
    "storm": measure_storm,
    "accuracy": measure_accuracy,
    "scrape": measure_scrape,
    "paired": measure_paired,
    "memory": measure_memory,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = MEASUREMENTS[spec["kind"]](spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
