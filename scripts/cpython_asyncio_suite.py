#!/usr/bin/env python3
"""Run CPython's own asyncio tests without and with loopscope and compare what passes.

Each module of ``test.test_asyncio`` (from the interpreter running this script) runs with
unittest in a subprocess twice: once plain, once with ``loopscope.install()`` called before
the module is imported, so that every loop the tests create is instrumented through the
patched constructors (the tests reset the event-loop policy freely; that does not matter).
The sets of passing test ids are compared.  A test that passes plain and not under
loopscope (or the other way round) is run again, alone, in both modes; only a difference
that repeats counts.  Differences listed in ``cpython_asyncio_allowed.txt`` (next to this
script, explained in docs/transparency.md) are allowed; any other makes the exit status 1.

    python scripts/cpython_asyncio_suite.py                   # the default modules
    python scripts/cpython_asyncio_suite.py test_tasks test_locks --jobs 2

The interpreter must be able to import loopscope (a venv with loopscope installed).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ALLOWED_FILE = HERE / "cpython_asyncio_allowed.txt"

DEFAULT_MODULES = (
    "test_tasks",
    "test_futures",
    "test_events",
    "test_base_events",
    "test_selector_events",
    "test_streams",
    "test_locks",
    "test_queues",
    "test_taskgroups",
    "test_timeouts",
    "test_runners",
)

#: What tests/test_cpython_suite.py runs by default, a few minutes per interpreter: every
#: default module, but of the two big ones (test_tasks, test_events) only the classes that
#: cover the C and the pure-Python Task and asyncio's own Linux loop.
QUICK = (
    "test_futures",
    "test_base_events",
    "test_selector_events",
    "test_streams",
    "test_locks",
    "test_queues",
    "test_taskgroups",
    "test_timeouts",
    "test_runners",
    "test_tasks.CTask_CFuture_Tests",
    "test_tasks.PyTask_PyFuture_Tests",
    "test_tasks.CTask_CFuture_SubclassTests",
    "test_events.EPollEventLoopTests",
    "test_events.HandleTests",
    "test_events.TimerTests",
    "test_events.AbstractEventLoopTests",
)

MODES = ("plain", "loopscope")
#: The one LOOPSCOPE_* variable the children keep: which hot path loopscope uses.  The
#: others would configure the installation, which the child makes with its own options.
HOT_PATH_VARIABLE = "LOOPSCOPE_PURE_PYTHON"
#: Seconds one test may take before its child process is stopped (with a traceback dump);
#: the module then goes on in a new child without that test.
TEST_TIMEOUT = 30.0
#: New children started for one module after tests that hung or crashed the interpreter.
MAX_RESTARTS = 5


# --- the child: runs tests and writes one JSON line per outcome ---------------------------


def _without(suite: Any, skip: set[str]) -> Any:
    import unittest

    if isinstance(suite, unittest.TestSuite):
        return unittest.TestSuite(_without(t, skip) for t in suite if _keep(t, skip))
    return suite


def _keep(test: Any, skip: set[str]) -> bool:
    import unittest

    return isinstance(test, unittest.TestSuite) or test.id() not in skip


def _child(mode: str, out_path: str, names: Sequence[str], skip: set[str]) -> int:
    import faulthandler
    import signal
    import unittest

    # A child started in the background by a non-interactive shell inherits SIGINT ignored;
    # asyncio.Runner then installs no handler and its interrupt tests hang.  Restore Python's.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for key in [k for k in os.environ if k.startswith("LOOPSCOPE_") and k != HOT_PATH_VARIABLE]:
        del os.environ[key]
    out = open(out_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def emit(**record: object) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    counter: dict[str, int] = {"loops": 0}
    if mode == "loopscope":
        from prometheus_client import CollectorRegistry

        import loopscope
        from loopscope import _installation

        installation = loopscope.install(registry=CollectorRegistry(), events="off")
        original_instrument = installation.instrument

        def counting_instrument(loop: object) -> object:
            probe = original_instrument(loop)
            if probe is not None:
                counter["loops"] += 1
            return probe

        installation.instrument = counting_instrument  # type: ignore[method-assign,assignment]
        assert _installation.current() is installation

    class Result(unittest.TestResult):
        def __init__(self) -> None:
            super().__init__()
            self.bad: set[str] = set()

        def startTest(self, test: unittest.TestCase) -> None:
            super().startTest(test)
            faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
            emit(event="start", id=test.id())

        def stopTest(self, test: unittest.TestCase) -> None:
            faulthandler.cancel_dump_traceback_later()
            super().stopTest(test)

        def addSuccess(self, test: unittest.TestCase) -> None:
            super().addSuccess(test)
            if test.id() not in self.bad:
                emit(event="pass", id=test.id())

        def addFailure(self, test: unittest.TestCase, err: object) -> None:
            super().addFailure(test, err)  # type: ignore[arg-type]
            emit(event="fail", id=test.id(), detail=self.failures[-1][1][-2000:])

        def addError(self, test: unittest.TestCase, err: object) -> None:
            super().addError(test, err)  # type: ignore[arg-type]
            emit(event="error", id=test.id(), detail=self.errors[-1][1][-2000:])

        def addSubTest(self, test: unittest.TestCase, subtest: object, err: object) -> None:
            super().addSubTest(test, subtest, err)  # type: ignore[arg-type]
            if err is not None:
                self.bad.add(test.id())
                emit(event="fail", id=test.id(), detail=f"subtest {subtest}")

        def addSkip(self, test: unittest.TestCase, reason: str) -> None:
            super().addSkip(test, reason)
            emit(event="skip", id=test.id())

        def addExpectedFailure(self, test: unittest.TestCase, err: object) -> None:
            super().addExpectedFailure(test, err)  # type: ignore[arg-type]
            emit(event="xfail", id=test.id())

        def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
            super().addUnexpectedSuccess(test)
            emit(event="fail", id=test.id(), detail="unexpected success")

    loader = unittest.TestLoader()
    for name in names:
        try:
            suite = loader.loadTestsFromName(name)
        except Exception as exc:  # a module this Python does not have
            emit(event="missing", id=name, detail=repr(exc))
            continue
        began = time.monotonic()
        if skip:
            suite = _without(suite, skip)
        suite.run(Result())
        emit(event="module", id=name, seconds=round(time.monotonic() - began, 1))
    if mode == "loopscope":
        import asyncio

        from loopscope import _hotpath, _installation

        still = getattr(asyncio.BaseEventLoop.__init__, "__wrapped__", None) is not None
        hot_path = "pure-Python" if _hotpath.twin is _hotpath.pure else "C"
        emit(event="summary", loops=counter["loops"], constructors_patched=still,
             installed=_installation.current() is not None, hot_path=hot_path)
    out.close()
    return 0


# --- the parent ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one run of some tests in one mode produced."""

    status: dict[str, str] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    loops: int = 0
    crashed: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    hot_path: str = ""

    def passed(self) -> set[str]:
        return {t for t, s in self.status.items() if s == "pass"}

    def merge(self, other: Outcome) -> None:
        self.status.update(other.status)
        self.details.update(other.details)
        self.missing |= other.missing
        self.loops += other.loops
        self.crashed += other.crashed
        self.seconds.update(other.seconds)
        self.hot_path = self.hot_path or other.hot_path


def _run_child(mode: str, names: Sequence[str], timeout: float) -> Outcome:
    """Run ``names`` in one mode; a test that hangs or kills the interpreter is recorded as
    ``crash`` and the rest runs in a new child."""
    outcome = Outcome()
    skip: set[str] = set()
    for _ in range(MAX_RESTARTS + 1):
        part, stuck = _run_child_once(mode, names, timeout, skip)
        outcome.merge(part)
        if stuck is None:
            break
        skip |= set(outcome.status)  # the stuck test and every test already done
    return outcome


def _run_child_once(
    mode: str, names: Sequence[str], timeout: float, skip: set[str]
) -> tuple[Outcome, str | None]:
    with tempfile.NamedTemporaryFile("w+", suffix=".jsonl", delete=False) as tmp:
        path = tmp.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--out", path]
    for test_id in sorted(skip):
        cmd += ["--skip", test_id]
    cmd += list(names)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LOOPSCOPE_") or k == HOT_PATH_VARIABLE
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    outcome = Outcome()
    try:
        proc = subprocess.run(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=timeout, check=False,
        )
        tail = proc.stdout.decode(errors="replace")[-1500:]
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"").decode(errors="replace")[-1500:]
        returncode = None
    started: str | None = None
    saw_summary = mode != "loopscope"
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            event = record["event"]
            if event == "start":
                started = record["id"]
                continue
            if event == "summary":
                saw_summary = True
                outcome.loops += int(record["loops"])
                outcome.hot_path = str(record.get("hot_path", ""))
                if not record["constructors_patched"] or not record["installed"]:
                    outcome.crashed.append(f"{mode}: loopscope was no longer installed at the end")
                continue
            if event == "module":
                outcome.seconds[f"{mode} {record['id']}"] = float(record["seconds"])
                continue
            if event == "missing":
                outcome.missing.add(record["id"])
                continue
            test_id = record["id"]
            if outcome.status.get(test_id) not in ("fail", "error"):
                outcome.status[test_id] = event
            if "detail" in record:
                outcome.details[test_id] = record["detail"]
            if started == test_id:
                started = None
    os.unlink(path)
    if returncode != 0 or not saw_summary:
        if started is not None:
            # One test hung or crashed: recorded as such; the caller runs the rest.
            outcome.status[started] = "crash"
            outcome.details[started] = tail
            return outcome, started
        why = "timed out" if returncode is None else f"exited with {returncode}"
        outcome.crashed.append(f"{mode} {' '.join(names)[:200]} {why}: {tail}")
    return outcome, None


def load_allowed(path: Path = ALLOWED_FILE) -> list[tuple[str, str]]:
    """(pattern, reason) pairs: a test id matching the pattern may differ."""
    allowed: list[tuple[str, str]] = []
    if not path.exists():
        return allowed
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, _, reason = line.partition(" ")
        allowed.append((pattern, reason.strip()))
    return allowed


def _allowed_reason(test_id: str, allowed: Iterable[tuple[str, str]]) -> str | None:
    for pattern, reason in allowed:
        if fnmatch.fnmatchcase(test_id, pattern):
            return reason or "listed"
    return None


def _run_all(
    modules: Sequence[str], jobs: int, timeout: float
) -> dict[str, Outcome]:
    results = {mode: Outcome() for mode in MODES}
    work = [(mode, f"test.test_asyncio.{m}") for m in modules for mode in MODES]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [(mode, pool.submit(_run_child, mode, [name], timeout)) for mode, name in work]
        for mode, future in futures:
            results[mode].merge(future.result())
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="test_asyncio modules (default: the core set)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one module may take in one mode (default 600)")
    parser.add_argument("--retries", type=int, default=2,
                        help="reruns of a differing test in each mode (default 2)")
    parser.add_argument("--max-retried", type=int, default=40,
                        help="rerun at most this many differing tests (default 40)")
    parser.add_argument("--json", help="write the comparison to this file")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--skip", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="the quick selection tests/test_cpython_suite.py runs by default")
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.out, args.modules, set(args.skip))

    modules = args.modules or list(QUICK if args.quick else DEFAULT_MODULES)
    began = time.monotonic()
    results = _run_all(modules, args.jobs, args.timeout)
    plain, scoped = results["plain"], results["loopscope"]
    crashes = plain.crashed + scoped.crashed
    missing = sorted(plain.missing | scoped.missing)

    first_diff = sorted(plain.passed() ^ scoped.passed())
    # Differences that do not repeat when the test runs alone are timing flukes.
    confirmed: list[str] = []
    flaky: list[str] = []
    for number, test_id in enumerate(first_diff):
        agree = True
        retries = args.retries if number < args.max_retried else 0
        for _ in range(max(0, retries)):
            again = {mode: _run_child(mode, [test_id], 120.0) for mode in MODES}
            ok = {mode: again[mode].status.get(test_id) == "pass" for mode in MODES}
            if ok["plain"] == ok["loopscope"]:
                agree = False
                break
            if test_id not in scoped.details and again["loopscope"].details.get(test_id):
                scoped.details[test_id] = again["loopscope"].details[test_id]
        (confirmed if agree else flaky).append(test_id)

    allowed = load_allowed()
    explained = {t: r for t in confirmed if (r := _allowed_reason(t, allowed)) is not None}
    unexplained = [t for t in confirmed if t not in explained]
    regressions = [t for t in unexplained if t in plain.passed()]

    version = ".".join(map(str, sys.version_info[:3]))
    print(f"CPython {version} test.test_asyncio, {len(modules)} modules, "
          f"{time.monotonic() - began:.0f} s")
    for mode in MODES:
        outcome = results[mode]
        counts: dict[str, int] = {}
        for status in outcome.status.values():
            counts[status] = counts.get(status, 0) + 1
        line = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        loops = ""
        if mode == "loopscope":
            loops = f"; {outcome.loops} loops instrumented, {outcome.hot_path} hot path"
        print(f"  {mode:9s}: {len(outcome.status)} tests: {line}{loops}")
        for test_id in sorted(t for t, status in outcome.status.items() if status == "crash"):
            print(f"    hung or crashed ({mode}): {test_id}")
    if missing:
        print(f"  not in this Python: {', '.join(m.rsplit('.', 1)[-1] for m in missing)}")
    print(f"  same set of passing tests except {len(first_diff)} on the first run; "
          f"{len(flaky)} did not repeat (timing), {len(explained)} allowed, "
          f"{len(unexplained)} unexplained")
    for test_id, reason in sorted(explained.items()):
        print(f"  allowed: {test_id}: {reason}")
    for test_id in flaky:
        print(f"  did not repeat: {test_id}")
    for test_id in unexplained:
        side = "passes only without loopscope" if test_id in regressions else \
            "passes only with loopscope"
        print(f"  UNEXPLAINED: {test_id} {side}")
        detail = scoped.details.get(test_id) or plain.details.get(test_id)
        if detail:
            print("    " + detail.strip().replace("\n", "\n    ")[-1500:])
    for crash in crashes:
        print(f"  CRASH: {crash}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "python": version,
            "modules": modules,
            "passed": {m: len(results[m].passed()) for m in MODES},
            "tests": {m: len(results[m].status) for m in MODES},
            "loops_instrumented": scoped.loops,
            "hot_path": scoped.hot_path,
            "first_run_differences": first_diff,
            "flaky": flaky,
            "allowed": explained,
            "unexplained": unexplained,
            "crashes": crashes,
            "hung": {m: sorted(t for t, st in results[m].status.items() if st == "crash")
                     for m in MODES},
            "missing": missing,
            "seconds": {**plain.seconds, **scoped.seconds},
        }, indent=2))
    return 1 if unexplained or crashes else 0


if __name__ == "__main__":
    sys.exit(main())
