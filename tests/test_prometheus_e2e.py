"""End to end: a real Prometheus scrapes the loopscope demo service, evaluates the rules in
prometheus/rules and answers every query of the Grafana dashboards.

One Prometheus scrapes six demo processes, three per loop implementation:

- ``demo-<loop>-loaded``: its loop is kept blocked by /block requests and its default
  executor kept full by /offload requests, which must fire the loop and executor alerts;
- ``demo-<loop>-healthy``: light, fast traffic, which must fire nothing;
- ``demo-<loop>-gone``: stopped once Prometheus has scraped it, which must fire the alert
  on absent metrics.

Prometheus loads a copy of the rules whose ``for:`` durations are cut to a few seconds and
whose one-minute rate windows are cut to WINDOW_IN_TEST, and scrapes and evaluates every
second. Both loop implementations run at once, so the slowest
alert (utilization over 0.9 in a 1m rate) is waited for once, not twice.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .ports import free_port

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "prometheus" / "rules"
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"

LOOPS = ("asyncio", "uvloop")
ROLES = ("loaded", "healthy", "gone")
#: ``for:`` of every alert in the rules copy Prometheus loads.
FOR_IN_TEST = "5s"
#: The window of every ``[1m]`` rate in that copy: the saturation alert needs its window
#: nearly full of load (about 55 s at 1m) before its rate passes 0.9.
WINDOW_IN_TEST = "20s"
#: Alerts the loaded service must fire, and the one the stopped service must fire.
LOADED_ALERTS = {
    "AsyncioLoopLagHigh",
    "AsyncioLoopBlocked",
    "AsyncioLoopSlowSteps",
    "AsyncioLoopSaturated",
    "AsyncioExecutorSaturated",
}
GONE_ALERTS = {"AsyncioLoopMetricsAbsent"}
#: What Grafana would put in place of its built-in variables at a 1s scrape interval.
GRAFANA_BUILT_INS = {"$__rate_interval": "30s", "$__interval": "15s", "$__range": "5m"}

#: Every wait is bounded; these are measured from the moment the load starts.
ALERTS_DEADLINE_S = 120.0
QUERIES_DEADLINE_S = 150.0
STARTUP_TIMEOUT_S = 30.0

T = TypeVar("T")


def http_get(url: str, timeout: float = 5.0) -> bytes:
    """The body of a GET on ``url``."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def wait_until(
    probe: Callable[[], T], done: Callable[[T], bool], deadline: float, interval: float = 0.5
) -> T:
    """Call ``probe`` until ``done`` holds for its result or ``deadline`` (monotonic) passes."""
    while True:
        try:
            result = probe()
        except OSError:
            if time.monotonic() >= deadline:
                raise
        else:
            if done(result) or time.monotonic() >= deadline:
                return result
        time.sleep(interval)


def start_prometheus(
    prometheus: str, config_path: Path, workdir: Path, *flags: str
) -> tuple[subprocess.Popen[bytes], str]:
    """Start Prometheus on a free port with ``config_path`` (and ``flags``), its data and
    log in ``workdir``; wait until it is ready. Its process and its URL."""
    web_port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
                "--log.level=warn",
                *flags,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    url = f"http://127.0.0.1:{web_port}"

    def ready() -> bool:
        if server.poll() is not None:
            return True
        try:
            return http_get(f"{url}/-/ready", timeout=2) != b""
        except OSError:
            return False

    wait_until(ready, bool, time.monotonic() + STARTUP_TIMEOUT_S, 0.2)
    if server.poll() is not None:
        pytest.fail(f"prometheus did not start:\n{tail(log, 40)}")
    return server, url


def binary(name: str) -> str:
    """Path of a Prometheus binary; missing fails the test under CI and skips it elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package 'prometheus')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for failure messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def grafana_regex_escape(value: str) -> str:
    """A variable's value escaped the way Grafana escapes it inside a PromQL =~ string."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(), value)


def fill_variables(expr: str, values: dict[str, str]) -> str:
    """A dashboard expression with Grafana's variables replaced, as Grafana would send it."""
    replacements = dict(GRAFANA_BUILT_INS)
    replacements.update({f"${name}": grafana_regex_escape(v) for name, v in values.items()})
    for name in sorted(replacements, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", replacements[name])
        expr = expr.replace(name, replacements[name])
    assert "$" not in expr, f"unfilled variable in {expr}"
    return expr


def dashboard_models() -> list[dict[str, Any]]:
    """Every dashboard's JSON model."""
    return [
        json.loads(p.read_text(encoding="utf-8")) for p in sorted(DASHBOARDS_DIR.glob("*.json"))
    ]


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL query of the dashboards' panels and annotations."""
    exprs = []
    for model in dashboard_models():
        panels = list(model["panels"])
        for panel in model["panels"]:
            panels.extend(panel.get("panels", []))
        for panel in panels:
            for target in panel.get("targets", []):
                exprs.append(
                    (f"{model['uid']}: {panel['title']} ({target['refId']})", target["expr"])
                )
        for annotation in model["annotations"]["list"]:
            if "expr" in annotation:
                exprs.append(
                    (f"{model['uid']}: annotation {annotation['name']}", annotation["expr"])
                )
    return exprs


def dashboard_variable_queries() -> list[tuple[str, str, str]]:
    """(variable name, series selector, label) for every label_values() variable."""
    found = []
    for model in dashboard_models():
        for var in model["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", query)
            assert match, query
            found.append((var["name"], match.group(1), match.group(2)))
    return found


def rules_for_test(target_dir: Path) -> list[Path]:
    """Copies of the rule files with every ``for:`` cut to FOR_IN_TEST and every one-minute
    window to WINDOW_IN_TEST (the rules' names still say ``rate1m``)."""
    target_dir.mkdir()
    copies = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        text = path.read_text(encoding="utf-8")
        shortened, count = re.subn(
            r"(?m)^([ \t]+for:[ \t]*)\S+[ \t]*$", rf"\g<1>{FOR_IN_TEST}", text
        )
        assert count == len(re.findall(r"(?m)^[ \t]+- alert:", text)), path.name
        shortened = shortened.replace("[1m]", f"[{WINDOW_IN_TEST}]")
        copy = target_dir / path.name
        copy.write_text(shortened, encoding="utf-8")
        copies.append(copy)
    return copies


@dataclass
class Demo:
    """One demo service process."""

    loop: str
    role: str
    port: int
    metrics_port: int
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def job(self) -> str:
        return f"demo-{self.loop}-{self.role}"

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


class Load:
    """Client threads that send requests in a loop until stopped; each request is bounded."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, port: int, path: str, clients: int = 1, pause: float = 0.0) -> None:
        for _ in range(clients):
            thread = threading.Thread(target=self._run, args=(port, path, pause), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, port: int, path: str, pause: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not self.stop.is_set():
            try:
                conn.request("GET", path)
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                with self._lock:
                    self.errors[path] = self.errors.get(path, 0) + 1
                conn.close()
                self.stop.wait(0.2)
            if pause:
                self.stop.wait(pause)
        conn.close()

    def close(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + 35
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


@dataclass
class Stack:
    """The running Prometheus, the demo services and the load."""

    prometheus_url: str
    prometheus_log: Path
    promtool: str
    demos: dict[tuple[str, str], Demo]
    load_started: float
    load: Load

    def demo(self, loop: str, role: str) -> Demo:
        return self.demos[(loop, role)]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant PromQL query."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = json.loads(http_get(url, timeout=10))
        except urllib.error.HTTPError as exc:
            with exc:  # Prometheus explains a bad query in the body of its 400 answer.
                body = json.loads(exc.read())
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        result = body["data"]["result"]
        return result if isinstance(result, list) else [{"value": result}]

    def alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts."""
        body = json.loads(http_get(f"{self.prometheus_url}/api/v1/alerts", timeout=10))
        return list(body["data"]["alerts"])

    def firing(self, job: str) -> set[str]:
        """Names of the alerts firing for ``job``."""
        return {
            a["labels"]["alertname"]
            for a in self.alerts()
            if a["state"] == "firing" and a["labels"].get("job") == job
        }

    def wait_for_firing(self, job: str, expected: set[str]) -> set[str]:
        """Wait, up to the alerts deadline, until every ``expected`` alert fires for ``job``."""
        deadline = self.load_started + ALERTS_DEADLINE_S
        return wait_until(lambda: self.firing(job), lambda got: expected <= got, deadline, 1.0)

    def diagnostics(self, *demos: Demo) -> str:
        """Log tails, for a failure message."""
        parts = [f"prometheus log:\n{tail(self.prometheus_log)}"]
        parts += [f"{d.job} log:\n{tail(d.log)}" for d in demos]
        parts.append(f"load errors: {self.load.errors}")
        return "\n\n".join(parts)


def start_demo(loop: str, role: str, logs: Path) -> Demo:
    """Start one demo service on free loopback ports."""
    port, metrics_port = free_port(), free_port()
    # Only the options this test chooses: none inherited from the shell running the tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSCOPE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT / "src")) if p)
    env["LOOPSCOPE_SLOW_THRESHOLD"] = "0.1"
    log = logs / f"demo-{loop}-{role}.log"
    command = [sys.executable, "-m", "loopscope.demo", "serve", "--loop", loop]
    command += ["--port", str(port), "--metrics-port", str(metrics_port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=logs,
        )
    return Demo(loop, role, port, metrics_port, log, process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate a process this test started, killing it if it does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def wait_for_demo(demo: Demo, deadline: float) -> None:
    """Wait until the demo answers on both ports."""

    def up() -> bool:
        if demo.process.poll() is not None:
            return True
        try:
            http_get(demo.metrics_url, timeout=2)
            http_get(f"http://127.0.0.1:{demo.port}/", timeout=2)
        except OSError:
            return False
        return True

    ready = wait_until(up, bool, deadline, 0.2)
    if demo.process.poll() is not None or not ready:
        pytest.fail(f"{demo.job} did not start:\n{tail(demo.log, 40)}")


def restart_demo_on_other_ports(demo: Demo, logs: Path) -> Demo:
    """A demo that could not bind a port free_port() handed out (another process took it
    first) is started again on other ports, at most twice; any other failure fails."""
    for attempt in range(3):
        if "address already in use" not in tail(demo.log, 40).lower() or attempt == 2:
            pytest.fail(f"{demo.job} did not start:\n{tail(demo.log, 40)}")
        stop_process(demo.process)
        demo = start_demo(demo.loop, demo.role, logs)
        try:
            wait_for_demo(demo, time.monotonic() + STARTUP_TIMEOUT_S)
            return demo
        except pytest.fail.Exception:
            continue
    raise AssertionError("unreachable")


def executor_max_workers(demo: Demo) -> int:
    """The default executor's size as the demo reports it (after one offloaded call)."""
    http_get(f"http://127.0.0.1:{demo.port}/offload?ms=1", timeout=10)
    text = http_get(demo.metrics_url).decode()
    sizes = [
        float(m.group(1))
        for m in re.finditer(r"^asyncio_executor_workers_max\{[^}]*\} (\S+)$", text, re.M)
    ]
    return int(max(sizes)) if sizes else 8


@pytest.fixture(name="stack", scope="module")
def fixture_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Prometheus scraping six demo services under load; everything stopped afterwards."""
    prometheus = binary("prometheus")
    promtool = binary("promtool")
    workdir = tmp_path_factory.mktemp("prometheus-e2e")
    demos: dict[tuple[str, str], Demo] = {}
    processes: list[subprocess.Popen[bytes]] = []
    load = Load()
    try:
        for loop in LOOPS:
            for role in ROLES:
                demo = start_demo(loop, role, workdir)
                demos[(loop, role)] = demo
                processes.append(demo.process)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for key, demo in demos.items():
            try:
                wait_for_demo(demo, deadline)
            except pytest.fail.Exception:
                demos[key] = restart_demo_on_other_ports(demo, workdir)
                processes.append(demos[key].process)

        rule_files = rules_for_test(workdir / "rules")
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": d.job, "static_configs": [{"targets": [d.instance]}]}
                for d in demos.values()
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
        check = subprocess.run(
            [promtool, "check", "config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr

        server, prometheus_url = start_prometheus(prometheus, config_path, workdir)
        processes.append(server)
        prometheus_log = workdir / "prometheus.log"

        for loop in LOOPS:
            loaded = demos[(loop, "loaded")]
            workers = executor_max_workers(loaded)
            # Twice the pool plus some: the queue never empties although every request
            # also waits for the blocked loop to read it and to write its answer.
            load.add(loaded.port, "/offload?ms=2000", clients=2 * workers + 4)
            load.add(loaded.port, "/block?ms=200", clients=2)
            healthy = demos[(loop, "healthy")]
            load.add(healthy.port, "/", pause=0.1)
            load.add(healthy.port, "/offload?ms=5", pause=0.5)
        stack = Stack(prometheus_url, prometheus_log, promtool, demos, time.monotonic(), load)

        # Once Prometheus has every service's metrics on record (a scrape of a loaded
        # service can time out on a busy machine), stop the "gone" services.
        seen = wait_until(
            lambda: stack.query("count by (job) (asyncio_loop_info)"),
            lambda result: len(result) == len(demos),
            time.monotonic() + STARTUP_TIMEOUT_S,
        )
        assert len(seen) == len(demos), stack.diagnostics(*demos.values())
        for demo in demos.values():
            if demo.role == "gone":
                stop_process(demo.process)
        yield stack
    finally:
        # The services go first, so that no client waits for an answer; all are asked to
        # stop at once, then waited for.
        load.stop.set()
        for process in processes:
            if process.poll() is None:
                process.terminate()
        load.close()
        for process in reversed(processes):
            stop_process(process)


@pytest.fixture(name="loop", params=LOOPS)
def fixture_loop(request: pytest.FixtureRequest) -> str:
    """The event loop implementation the demo service runs on."""
    return str(request.param)


class TestExposition:
    """The demo's /metrics is valid and reports the loop it runs on."""

    def test_promtool_check_metrics_reports_nothing(self, stack: Stack, loop: str) -> None:
        """`promtool check metrics` has nothing to say about the live exposition."""
        exposition = http_get(stack.demo(loop, "loaded").metrics_url)
        result = subprocess.run(
            [stack.promtool, "check", "metrics"],
            input=exposition,
            capture_output=True,
            timeout=60,
            check=False,
        )
        report = (result.stdout + result.stderr).decode(errors="replace")
        assert result.returncode == 0, report
        assert report.strip() == ""

    def test_loop_implementation_reported(self, stack: Stack, loop: str) -> None:
        """Prometheus sees asyncio_loop_info with the implementation the demo was started on."""
        demo = stack.demo(loop, "loaded")
        result = stack.query(f'asyncio_loop_info{{job="{demo.job}"}}')
        assert {r["metric"]["implementation"] for r in result} == {loop}


class TestAlerts:
    """The alerts fire for induced faults and stay quiet for a healthy service."""

    def test_blocked_loop_and_full_executor_fire(self, stack: Stack, loop: str) -> None:
        """Blocking the loop and filling the executor fires every loop and executor alert."""
        demo = stack.demo(loop, "loaded")
        firing = stack.wait_for_firing(demo.job, LOADED_ALERTS)
        assert firing >= LOADED_ALERTS, f"missing {LOADED_ALERTS - firing}\n" + stack.diagnostics(
            demo
        )

    def test_stopped_service_fires_absent(self, stack: Stack, loop: str) -> None:
        """A service that stops exporting fires AsyncioLoopMetricsAbsent for its job."""
        demo = stack.demo(loop, "gone")
        firing = stack.wait_for_firing(demo.job, GONE_ALERTS)
        assert firing == GONE_ALERTS, stack.diagnostics(demo)

    def test_healthy_service_stays_quiet(self, stack: Stack, loop: str) -> None:
        """No alert fires at any time, nor is pending now, for the service under light load."""
        # Judge only once the faulty service has fired, so the healthy one had as long.
        stack.wait_for_firing(stack.demo(loop, "loaded").job, LOADED_ALERTS)
        healthy = stack.demo(loop, "healthy")
        assert stack.query(f'ALERTS{{job="{healthy.job}"}}') == []
        fired = stack.query(f'ALERTS{{job="{healthy.job}", alertstate="firing"}}[10m]')
        assert fired == [], stack.diagnostics(healthy)
        assert stack.query(f'asyncio_loop_info{{job="{healthy.job}"}}'), "healthy not scraped"


class TestDashboardQueries:
    """Every query of the dashboards returns data from the real Prometheus."""

    @staticmethod
    def _variables(stack: Stack, loop: str) -> dict[str, str]:
        demo = stack.demo(loop, "loaded")
        (info,) = stack.query(f'asyncio_loop_info{{job="{demo.job}"}}')
        executors = stack.query(f'asyncio_executor_workers_max{{job="{demo.job}"}}')
        assert executors, "the demo reports no executor metrics\n" + stack.diagnostics(demo)
        return {
            "datasource": "prometheus",
            "job": demo.job,
            "instance": demo.instance,
            "loop": info["metric"]["loop"],
            "executor": executors[0]["metric"]["executor"],
        }

    @staticmethod
    def _has_data(result: list[dict[str, Any]]) -> bool:
        return any(not math.isnan(float(r["value"][1])) for r in result)

    def test_every_panel_query_returns_data(self, stack: Stack, loop: str) -> None:
        """Each panel and annotation query, variables filled in, returns a number."""
        stack.wait_for_firing(stack.demo(loop, "loaded").job, LOADED_ALERTS)
        values = self._variables(stack, loop)
        queries = {where: fill_variables(expr, values) for where, expr in dashboard_exprs()}
        assert queries
        deadline = stack.load_started + QUERIES_DEADLINE_S
        empty = wait_until(
            lambda: [w for w, q in queries.items() if not self._has_data(stack.query(q))],
            lambda missing: not missing,
            deadline,
            1.0,
        )
        assert not empty, "no data for:\n" + "\n".join(f"{w}: {queries[w]}" for w in empty)

    def test_every_variable_offers_the_service(self, stack: Stack, loop: str) -> None:
        """Each variable's label_values() query offers the loaded service's value."""
        values = self._variables(stack, loop)
        for name, selector, label in dashboard_variable_queries():
            query = fill_variables(f"count by ({label}) ({selector})", values)
            offered = {r["metric"].get(label) for r in stack.query(query)}
            assert values[name] in offered, f"{name}: {query} offers {offered}"
