"""The Grafana dashboards and provisioning files in grafana/, checked without a Grafana server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .promql import EXPORTED, metric_names

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"
PROVISIONING_DIR = ROOT / "grafana" / "provisioning"
RULES_DIR = ROOT / "prometheus" / "rules"
SNIPPET = ROOT / "docs" / "dashboards-and-alerts.md"

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
LOOP_VARIABLES = ("job", "instance", "loop")

#: Exported series without a loop label.
PROCESS_WIDE = {"process_context_switches_total"}
#: Series Prometheus itself makes, which a dashboard may read.
BUILT_IN = {"ALERTS"}

#: Values Grafana would put in place of its variables, for checking expressions offline.
SAMPLE_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$datasource": "prometheus",
    "$job": "api",
    "$instance": "10.0.0.1:9464",
    "$loop": "MainThread",
    "$executor": "default",
}
PANEL_TYPES = {"row", "timeseries", "stat", "table", "heatmap", "bargauge", "gauge", "text"}


def selectors(expr: str) -> Iterator[tuple[str, str]]:
    """Each series selector in an expression, as (metric name, label matchers text)."""
    for match in re.finditer(r"([A-Za-z_:][\w:]*)\s*(\{[^{}]*\})?", expr):
        if match.group(1) in metric_names(expr):
            yield match.group(1), match.group(2) or ""


def fill_variables(expr: str) -> str:
    """The expression with Grafana's variables replaced by sample values."""
    for name in sorted(SAMPLE_VARIABLES, key=len, reverse=True):
        value = SAMPLE_VARIABLES[name]
        expr = expr.replace("${" + name[1:] + "}", value).replace(name, value)
    return expr


def load_yaml(path: Path) -> Any:
    """A YAML file's content."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def recording_rule_names() -> set[str]:
    """Names of the recording rules in prometheus/rules."""
    names = set()
    for path in RULES_DIR.glob("*.yml"):
        for group in load_yaml(path)["groups"]:
            names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


def recording_rule_sources() -> dict[str, set[str]]:
    """For each recording rule, the exported series it reads, directly or through other rules."""
    sources: dict[str, set[str]] = {}
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    names = metric_names(rule["expr"])
                    resolved = names - sources.keys()
                    for name in names & sources.keys():
                        resolved |= sources[name]
                    sources[rule["record"]] = resolved
    return sources


DASHBOARD_PATHS = sorted(DASHBOARDS_DIR.glob("*.json"))


@pytest.fixture(name="dashboard", params=DASHBOARD_PATHS, ids=[p.name for p in DASHBOARD_PATHS])
def fixture_dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    """One dashboard's JSON model."""
    path: Path = request.param
    model = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(model, dict)
    return model


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data (all but rows and text)."""
    return [p for p in all_panels(dashboard) if p["type"] not in {"row", "text"}]


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the panels and the annotations."""
    exprs = [t["expr"] for p in query_panels(dashboard) for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return exprs


def variable(dashboard: dict[str, Any], name: str) -> dict[str, Any]:
    """The template variable called ``name``."""
    matches: list[dict[str, Any]] = [
        v for v in dashboard["templating"]["list"] if v["name"] == name
    ]
    assert len(matches) == 1, f"variable {name}: {len(matches)} definitions"
    return matches[0]


def variable_query(var: dict[str, Any]) -> str:
    """The query text of a query variable, from either of Grafana's two forms."""
    query = var["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def label_values(query: str) -> tuple[str, str]:
    """The series selector and the label of a Grafana label_values() variable query."""
    match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", query)
    assert match, f"not a label_values() query: {query}"
    return match.group(1), match.group(2)


@pytest.fixture(name="promtool")
def fixture_promtool() -> str:
    """Path of promtool; a missing one fails the test under CI and skips it elsewhere."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed (Debian package 'prometheus')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class TestDashboardModel:
    """Each file is a dashboard model Grafana can provision as it is."""

    def test_there_is_an_overview_dashboard(self) -> None:
        """grafana/dashboards holds the loopscope overview dashboard."""
        assert DASHBOARDS_DIR / "loopscope-overview.json" in DASHBOARD_PATHS

    def test_top_level_fields(self, dashboard: dict[str, Any]) -> None:
        """The model has the fields of a dashboard, and no id that would clash on import."""
        for key in ("title", "uid", "panels", "templating", "annotations", "time", "schemaVersion"):
            assert key in dashboard, key
        assert dashboard.get("id") is None
        assert isinstance(dashboard["schemaVersion"], int)
        assert dashboard["schemaVersion"] >= 36
        assert dashboard["title"].strip()

    def test_fixed_uid(self, dashboard: dict[str, Any]) -> None:
        """The uid is fixed and valid, so links and re-imports keep pointing at it."""
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])

    def test_uids_are_unique(self) -> None:
        """No two dashboards share a uid or a title."""
        models = [json.loads(p.read_text(encoding="utf-8")) for p in DASHBOARD_PATHS]
        assert len({m["uid"] for m in models}) == len(models)
        assert len({m["title"] for m in models}) == len(models)

    def test_tags(self, dashboard: dict[str, Any]) -> None:
        """The dashboard is tagged loopscope (and more)."""
        assert "loopscope" in dashboard["tags"]
        assert all(isinstance(tag, str) and tag for tag in dashboard["tags"])

    def test_no_import_inputs(self, dashboard: dict[str, Any]) -> None:
        """No ${DS_...} inputs, which file provisioning cannot resolve."""
        assert "__inputs" not in dashboard
        assert "${DS_" not in json.dumps(dashboard)

    def test_panel_ids_unique(self, dashboard: dict[str, Any]) -> None:
        """Every panel has its own integer id."""
        ids = [p["id"] for p in all_panels(dashboard)]
        assert all(isinstance(i, int) for i in ids)
        assert len(ids) == len(set(ids))

    def test_panel_types_known(self, dashboard: dict[str, Any]) -> None:
        """Panels use Grafana's built-in panel types only, no plugin to install."""
        for panel in all_panels(dashboard):
            assert panel["type"] in PANEL_TYPES, panel["title"]

    def test_panels_titled_and_described(self, dashboard: dict[str, Any]) -> None:
        """Every panel has a title, and every data panel a description."""
        for panel in all_panels(dashboard):
            assert panel.get("title", "").strip()
        for panel in query_panels(dashboard):
            assert panel.get("description", "").strip(), panel["title"]

    def test_grid_fits_and_does_not_overlap(self, dashboard: dict[str, Any]) -> None:
        """Every panel lies within the 24-column grid and no two panels overlap."""
        cells: dict[tuple[int, int], str] = {}
        for panel in dashboard["panels"]:
            pos = panel["gridPos"]
            assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["y"] >= 0
            assert pos["x"] + pos["w"] <= 24, panel["title"]
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = panel["title"]


class TestTemplating:
    """Variables choose the datasource, job, instance and loop."""

    def test_datasource_variable(self, dashboard: dict[str, Any]) -> None:
        """A datasource variable of type prometheus."""
        var = variable(dashboard, "datasource")
        assert var["type"] == "datasource"
        assert var["query"] == "prometheus"

    def test_loop_variables(self, dashboard: dict[str, Any]) -> None:
        """job, instance and loop are query variables on the chosen datasource."""
        for name in LOOP_VARIABLES:
            var = variable(dashboard, name)
            assert var["type"] == "query"
            assert var["datasource"] == DATASOURCE_REF
            assert var["multi"] and var["includeAll"], name
            _, label = label_values(variable_query(var))
            assert label == name

    def test_variables_narrow_each_other(self, dashboard: dict[str, Any]) -> None:
        """instance offers the chosen jobs' instances; loop the chosen instances' loops."""
        _, instance_selector = next(
            selectors(label_values(variable_query(variable(dashboard, "instance")))[0])
        )
        assert 'job=~"$job"' in instance_selector
        loop_selector = label_values(variable_query(variable(dashboard, "loop")))[0]
        assert 'job=~"$job"' in loop_selector and 'instance=~"$instance"' in loop_selector

    def test_variable_queries_name_known_series(self, dashboard: dict[str, Any]) -> None:
        """Variable queries read series loopscope exports."""
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query":
                selector, _ = label_values(variable_query(var))
                assert metric_names(selector) <= EXPORTED, var["name"]

    def test_every_query_uses_the_datasource_variable(self, dashboard: dict[str, Any]) -> None:
        """Panels and their queries take their datasource from the variable."""
        for panel in query_panels(dashboard):
            assert panel["datasource"] == DATASOURCE_REF, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE_REF, panel["title"]
        for annotation in dashboard["annotations"]["list"]:
            if "expr" in annotation:
                assert annotation["datasource"] == DATASOURCE_REF


class TestQueries:
    """Every panel queries series that exist."""

    def test_every_panel_has_a_query(self, dashboard: dict[str, Any]) -> None:
        """Each data panel has at least one target with a PromQL expression."""
        for panel in query_panels(dashboard):
            targets = panel.get("targets", [])
            assert targets, panel["title"]
            for target in targets:
                assert target.get("expr", "").strip(), panel["title"]
                assert not target.get("hide", False), panel["title"]

    def test_ref_ids_unique_per_panel(self, dashboard: dict[str, Any]) -> None:
        """Targets of one panel have distinct refIds."""
        for panel in query_panels(dashboard):
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]

    def test_queries_name_known_series(self, dashboard: dict[str, Any]) -> None:
        """Each series a query names is exported by loopscope or is a recording rule."""
        known = EXPORTED | recording_rule_names() | BUILT_IN
        for expr in panel_exprs(dashboard):
            names = metric_names(expr)
            assert names, expr
            assert names <= known, f"unknown series {names - known} in {expr}"

    def test_queries_follow_the_variables(self, dashboard: dict[str, Any]) -> None:
        """Each loop series is filtered on $job, $instance and $loop; process series on two."""
        for expr in panel_exprs(dashboard):
            for name, matchers in selectors(expr):
                if name in BUILT_IN:
                    continue
                wanted = ("job", "instance") if name in PROCESS_WIDE else LOOP_VARIABLES
                for label in wanted:
                    assert f'{label}=~"${label}"' in matchers, f"{label} in {expr}"

    def test_every_exported_metric_is_shown(self, dashboard: dict[str, Any]) -> None:
        """Every metric family loopscope exports is read, directly or through a recording rule."""
        sources = recording_rule_sources()
        read: set[str] = set()
        for expr in panel_exprs(dashboard):
            for name in metric_names(expr):
                read |= sources.get(name, {name})
        families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in read}
        exported = {re.sub(r"_(bucket|sum|count)$", "", name) for name in EXPORTED}
        assert exported <= families, exported - families

    def test_heatmap_reads_buckets(self, dashboard: dict[str, Any]) -> None:
        """Heatmaps read cumulative buckets by le, formatted as a heatmap, not recalculated."""
        heatmaps = [p for p in query_panels(dashboard) if p["type"] == "heatmap"]
        for panel in heatmaps:
            assert panel["options"]["calculate"] is False
            for target in panel["targets"]:
                assert target["format"] == "heatmap"
                assert "by (le)" in target["expr"]
                assert target["legendFormat"] == "{{le}}"

    def test_callback_duration_shows_exemplars(self, dashboard: dict[str, Any]) -> None:
        """The callback-duration heatmap asks for exemplars, on the exported buckets (a
        recording rule's series carries none)."""
        panels = [
            p
            for p in query_panels(dashboard)
            if any("callback_duration_seconds_bucket" in t["expr"] for t in p["targets"])
            and p["type"] == "heatmap"
        ]
        assert panels
        for panel in panels:
            targets = [t for t in panel["targets"] if t.get("exemplar") is True]
            assert targets, panel["title"]
            for target in targets:
                assert metric_names(target["expr"]) == {
                    "asyncio_loop_callback_duration_seconds_bucket"
                }, target["expr"]

    def test_expressions_parse(
        self, dashboard: dict[str, Any], promtool: str, tmp_path: Path
    ) -> None:
        """promtool accepts every expression, variables filled in, as valid PromQL."""
        exprs = panel_exprs(dashboard)
        rules = [
            {"record": f"dashboard:query_{i}:check", "expr": fill_variables(e)}
            for i, e in enumerate(exprs)
        ]
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query":
                selector, label = label_values(variable_query(var))
                rules.append(
                    {
                        "record": f"dashboard:variable_{var['name']}:check",
                        "expr": fill_variables(f"count by ({label}) ({selector})"),
                    }
                )
        path = tmp_path / "dashboard-queries.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        result = subprocess.run(
            [promtool, "check", "rules", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "$" not in path.read_text(), "a Grafana variable was left unfilled"


class TestProvisioning:
    """grafana/provisioning makes the dashboards appear in a mounted Grafana."""

    def test_datasource(self) -> None:
        """One default Prometheus datasource is provisioned."""
        files = sorted((PROVISIONING_DIR / "datasources").glob("*.yml"))
        assert files
        datasources = [ds for path in files for ds in load_yaml(path)["datasources"]]
        for path in files:
            assert load_yaml(path)["apiVersion"] == 1
        assert [ds["type"] for ds in datasources] == ["prometheus"]
        assert datasources[0]["isDefault"] is True
        assert datasources[0]["url"]

    def test_dashboard_provider(self) -> None:
        """A file provider loads the dashboards from the folder the docs say to mount."""
        files = sorted((PROVISIONING_DIR / "dashboards").glob("*.yml"))
        assert len(files) == 1
        config = load_yaml(files[0])
        assert config["apiVersion"] == 1
        (provider,) = config["providers"]
        assert provider["type"] == "file"
        path = provider["options"]["path"]
        assert path.startswith("/")
        assert f"grafana/dashboards:{path}" in SNIPPET.read_text(encoding="utf-8")
        assert "grafana/provisioning:/etc/grafana/provisioning" in SNIPPET.read_text(
            encoding="utf-8"
        )
