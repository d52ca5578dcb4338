"""The Grafana dashboard (helm/ifw/dashboards/ifw.json) and its ConfigMap.

Every panel's PromQL is parsed by the real promtool (as recording rules of a synthetic rule
group: promtool parses each expression without a server) and may name only metrics that the code
defines: read from the prometheus_client objects of the operator, gateway and runner modules, not
from a list kept by hand. kube-state-metrics names are allowed by an explicit list.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.conftest import CHART, one

DASHBOARD = CHART / "dashboards" / "ifw.json"
# Metrics of kube-state-metrics the chart's rules may use (the code cannot define them).
KUBE_STATE_METRICS = {"kube_pod_container_status_restarts_total"}
# Grafana's variables, as the tests substitute them to get plain PromQL.
VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$namespace": ".*"}
_NAME = re.compile(r"\b(?:ifw|kube)_[a-zA-Z0-9_:]*")


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool not found: apt-get install prometheus (.ci/setup installs it)", pytrace=False)
    return found


def panel_queries(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL with Grafana's variables substituted) of every target."""
    dashboard = dashboard or json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets") or []:
            expr = target["expr"]
            for variable, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(variable, value)
            found.append((panel["title"], target["refId"], expr))
    return found


def code_metric_names() -> set[str]:
    """Every sample name the code's prometheus_client objects expose (``_total``, ``_bucket``...)."""
    from prometheus_client import REGISTRY

    import ifw.runner.batching  # noqa: F401 - registers the pool worker's metrics
    import ifw.runner.metrics  # noqa: F401
    import ifw.runner.models  # noqa: F401 - ifw_runner_model_info, ifw_runner_model_load_seconds
    from ifw.gateway import metrics as gateway
    from ifw.operator import metrics as operator

    names: set[str] = set(REGISTRY._names_to_collectors) | set(gateway.REGISTRY._names_to_collectors)
    # The operator's state collector is registered at start-up: collect it from stand-in state.
    stats = dict.fromkeys(("waiting", "assigned", "workers_ready", "workers_draining", "capacity"), 0)
    for family in operator.StateCollector(lambda: [], lambda: 0, lambda: 0, lambda: stats).collect():
        names |= {sample.name for sample in family.samples}
    return names


def metric_names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def check_parses(queries: list[tuple[str, str]], tmp_path: Path) -> subprocess.CompletedProcess:
    """promtool check rules on a group recording each (name, expr): promtool parses every expression."""
    rules = {"groups": [{"name": "parse", "rules": [{"record": f"ifw:parse:{i}", "expr": expr}
                                                     for i, (_, expr) in enumerate(queries)]}]}  # fmt: skip
    path = tmp_path / "parse.rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_the_dashboard_is_grafana_json_with_the_panels_asked_for():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in ("Jobs by phase", "Waiting and running", "Failures by reason", "Time to start", "Real-time factor",
                   "Audio transcribed", "Pool workers", "Batching", "Requests", "Request latency",
                   "Webhook deliveries", "Assignment wait", "GPU memory peak", "Models loaded"):  # fmt: skip
        assert wanted in titles, wanted
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_every_panel_query_parses(tmp_path):
    queries = [(f"{title}/{ref}", expr) for title, ref, expr in panel_queries()]
    assert len(queries) >= 20
    result = check_parses(queries, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_refuses_a_query_that_does_not_parse(tmp_path):
    # The check above is worth something only if a broken query fails it.
    result = check_parses([("broken", "sum by (phase (ifw_operator_jobs)")], tmp_path)
    assert result.returncode != 0


def test_every_metric_a_panel_names_is_defined_by_the_code():
    defined = code_metric_names()
    assert {"ifw_operator_jobs", "ifw_gateway_requests_total", "ifw_worker_queued_pieces",
            "ifw_operator_audio_seconds_total", "ifw_runner_gpu_memory_peak_bytes"} <= defined  # fmt: skip
    used: set[str] = set()
    for title, ref, expr in panel_queries():
        names = metric_names(expr)
        assert names, f"{title}/{ref} names no ifw metric: {expr}"
        unknown = names - defined
        assert not unknown, f"{title}/{ref} names metrics no code defines: {sorted(unknown)}"
        used |= names
    # The namespace variable's query too.
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] == "query":
            assert metric_names(variable["definition"]) <= defined


def test_the_dashboard_configmap_is_opt_in_and_carries_the_sidecar_label(helm):
    assert not [o for o in helm.template() if o["metadata"]["name"].endswith("-dashboard")]
    objects = helm.template("--set", "metrics.dashboard.enabled=true")
    cm = one(objects, "ConfigMap", "ifw-dashboard")
    assert cm["metadata"]["namespace"] == "ifw-system"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["ifw.json"]) == json.loads(DASHBOARD.read_text())


def test_the_dashboard_configmap_labels_annotations_and_namespace_are_configurable(helm):
    objects = helm.template("--set", "metrics.dashboard.enabled=true", "--set", "metrics.dashboard.namespace=monitoring",
                            "--set-json", 'metrics.dashboard.labels={"grafana_dashboard": "ifw"}',
                            "--set", "metrics.dashboard.annotations.grafana_folder=Transcription")  # fmt: skip
    cm = one(objects, "ConfigMap", "ifw-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "ifw"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Transcription"}
