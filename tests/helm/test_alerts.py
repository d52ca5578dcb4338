"""The chart's PrometheusRule, rendered by the real helm and checked by the real promtool.

`promtool check rules` on the rendered rule groups, and `promtool test rules` with a firing and a
quiet case per alert (series written here, evaluated by Prometheus's own rule engine). Each alert's
runbook_url points to a runbook paragraph of the chart's README, and names only metrics the code
defines (or kube-state-metrics', listed).
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from tests.helm.conftest import CHART, by_kind, one
from tests.helm.test_dashboard import KUBE_STATE_METRICS, code_metric_names, metric_names, promtool

NS = "ifw-system"
RULE = ("--set", "metrics.prometheusRule.enabled=true")
ALERTS = ["IfwJobsFailing", "IfwQueueWithoutWorker", "IfwPoolAssignmentStuck", "IfwWebhookDeliveriesFailing",
          "IfwReconcileErrors", "IfwPoolWorkersRestarting", "IfwGateway5xx"]  # fmt: skip
POOL_POD = "ifw-pool-5d8f7c9b4-x2k4q"


def _s(metric: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"namespace": NS, **labels}
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{inner}}}", "values": values}


# alert -> (eval time, firing input, the firing alert's own labels, quiet input)
CASES: dict[str, tuple[str, list, dict, list]] = {
    "IfwJobsFailing": (
        "10m",
        [_s("ifw_operator_job_failures_total", "0+1x15", reason="OutOfMemory")],
        {"reason": "OutOfMemory"},
        # Two failures of one reason, one of another: under the threshold (3).
        [
            _s("ifw_operator_job_failures_total", "0 0 1 1 2 2 2 2 2 2 2 2", reason="OutOfMemory"),
            _s("ifw_operator_job_failures_total", "0 0 0 1 1 1 1 1 1 1 1 1", reason="AudioFetchFailed"),
        ],
    ),
    "IfwQueueWithoutWorker": (
        "20m",
        [_s("ifw_operator_pool_jobs", "2x30", state="waiting"), _s("ifw_operator_pool_workers", "0x30", state="ready")],
        {},
        # Waiting jobs, but a worker is ready (busy): the queue drains.
        [_s("ifw_operator_pool_jobs", "2x30", state="waiting"), _s("ifw_operator_pool_workers", "1x30", state="ready")],
    ),
    "IfwPoolAssignmentStuck": (
        "15m",
        [_s("ifw_operator_pool_unstarted_oldest_seconds", "0+60x20")],
        {},
        # Jobs wait a couple of minutes at most after their assignment, then run.
        [_s("ifw_operator_pool_unstarted_oldest_seconds", "0 30 120 0 5 90 0 0 10 20 30 40 0 0 0 0 0 0 0 0")],
    ),
    "IfwWebhookDeliveriesFailing": (
        "35m",
        [
            _s("ifw_operator_webhook_deliveries_total", "0+2x40", outcome="failed"),
            _s("ifw_operator_webhook_deliveries_total", "0+1x40", outcome="delivered"),
        ],
        {},
        # An occasional failed attempt (retried) among many delivered ones.
        [
            _s("ifw_operator_webhook_deliveries_total", "0+1x40", outcome="failed"),
            _s("ifw_operator_webhook_deliveries_total", "0+10x40", outcome="delivered"),
        ],
    ),
    "IfwReconcileErrors": (
        "30m",
        [_s("ifw_operator_reconcile_errors_total", "0+5x40")],
        {},
        [_s("ifw_operator_reconcile_errors_total", "0+0.2x40")],
    ),
    "IfwPoolWorkersRestarting": (
        "10m",
        [_s("kube_pod_container_status_restarts_total", "0 0 1 1 2 2 3 3 3 3 3", pod=POOL_POD, container="worker")],
        {"pod": POOL_POD},
        # One restart of a worker, and the gateway (not a pool worker) restarting a lot.
        [
            _s("kube_pod_container_status_restarts_total", "0 0 1 1 1 1 1 1 1 1 1", pod=POOL_POD, container="worker"),
            _s(
                "kube_pod_container_status_restarts_total",
                "0+1x10",
                pod="ifw-gateway-6b7f9d8c5-abcde",
                container="gateway",
            ),
        ],
    ),
    "IfwGateway5xx": (
        "30m",
        [
            _s("ifw_gateway_requests_total", "0+3x40", route="/", method="POST", status="500"),
            _s("ifw_gateway_requests_total", "0+10x40", route="/", method="POST", status="200"),
        ],
        {},
        [
            _s("ifw_gateway_requests_total", "0+0.1x40", route="/", method="POST", status="503"),
            _s("ifw_gateway_requests_total", "0+10x40", route="/", method="POST", status="200"),
            _s("ifw_gateway_requests_total", "0+5x40", route="/v1/tasks", method="GET", status="404"),
        ],
    ),
}


def rendered_rule(helm, *args: str) -> dict[str, Any]:
    return one(helm.template(*RULE, *args), "PrometheusRule", "ifw")


def alerts_of(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


@pytest.fixture(scope="module")
def rule(helm) -> dict[str, Any]:
    return rendered_rule(helm)


def test_the_rule_is_opt_in(helm):
    assert not by_kind(helm.template(), "PrometheusRule")


def test_promtool_accepts_the_rendered_rules(rule, tmp_path):
    path = tmp_path / "ifw.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout, result.stdout


def test_each_alert_fires_on_its_case_and_stays_quiet_otherwise(rule, tmp_path):
    alerts = alerts_of(rule)
    assert sorted(alerts) == sorted(ALERTS) == sorted(CASES)
    # The descriptions interpolate $value (their templates are checked by `check rules`): the
    # test compares the other annotations, so it drops them here.
    groups = [{**g, "rules": [{**r, "annotations": {k: v for k, v in r["annotations"].items() if k != "description"}}
                              for r in g["rules"]]} for g in rule["spec"]["groups"]]  # fmt: skip
    (tmp_path / "ifw.rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    tests = []
    for name, (at, firing, labels, quiet) in CASES.items():
        expected = {
            "exp_labels": {"namespace": NS, "severity": alerts[name]["labels"]["severity"], **labels},
            "exp_annotations": {k: v for k, v in alerts[name]["annotations"].items() if k != "description"},
        }
        expected["exp_annotations"]["summary"] = expected["exp_annotations"]["summary"].replace(
            "{{ $labels.reason }}", labels.get("reason", "")
        )
        tests.append(
            {
                "name": f"{name} fires",
                "interval": "1m",
                "input_series": firing,
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": [expected]}],
            }
        )
        tests.append(
            {
                "name": f"{name} stays quiet",
                "interval": "1m",
                "input_series": quiet,
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": []}],
            }
        )
        # Nothing else fires on either input: each case speaks for its own alert only.
        for other in ALERTS:
            if other != name:
                tests[-1]["alert_rule_test"].append({"eval_time": at, "alertname": other, "exp_alerts": []})
    path = tmp_path / "ifw.test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": ["ifw.rules.yaml"], "evaluation_interval": "1m", "tests": tests},
                                   sort_keys=False))  # fmt: skip
    result = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_fails_when_an_alert_is_expected_that_does_not_fire(rule, tmp_path):
    # The quiet cases are worth something only if a wrong expectation fails.
    (tmp_path / "ifw.rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    at, _, _, quiet = CASES["IfwGateway5xx"]
    test = {
        "interval": "1m",
        "input_series": quiet,
        "alert_rule_test": [{"eval_time": at, "alertname": "IfwGateway5xx", "exp_alerts": [{"exp_labels": {}}]}],
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"rule_files": ["ifw.rules.yaml"], "tests": [test]}))
    result = subprocess.run([promtool(), "test", "rules", "t.yaml"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0


def test_every_alert_has_a_runbook_in_the_readme(rule):
    readme = (CHART / "README.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", readme, re.M)
    }  # GitHub's heading anchors
    for name, alert in alerts_of(rule).items():
        url = alert["annotations"]["runbook_url"]
        assert url.startswith("https://github.com/ifw/ifw/blob/main/helm/ifw/README.md#"), url
        assert url.split("#", 1)[1] in anchors, f"{name}: no README heading for {url}"
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_the_alerts_name_only_metrics_the_code_defines(rule):
    defined = code_metric_names() | KUBE_STATE_METRICS
    for name, alert in alerts_of(rule).items():
        names = metric_names(alert["expr"])
        assert names and not names - defined, f"{name}: {sorted(names - defined)}"
    assert metric_names(alerts_of(rule)["IfwPoolWorkersRestarting"]["expr"]) == KUBE_STATE_METRICS


def test_options_selector_disabled_alert_labels_and_thresholds(helm):
    rule = rendered_rule(helm, "--set", 'metrics.prometheusRule.selector=job="ifw"',
                         "--set-json", 'metrics.prometheusRule.disabled=["IfwPoolWorkersRestarting"]',
                         "--set", "metrics.prometheusRule.alertLabels.team=speech",
                         "--set", "metrics.prometheusRule.labels.release=kube-prometheus-stack",
                         "--set", "metrics.prometheusRule.thresholds.stuckAssignmentMinutes=20",
                         "--set", "metrics.prometheusRule.runbookUrl=https://runbooks.example.com/ifw")  # fmt: skip
    alerts = alerts_of(rule)
    assert "IfwPoolWorkersRestarting" not in alerts and len(alerts) == len(ALERTS) - 1
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert all(a["labels"]["team"] == "speech" for a in alerts.values())
    assert all('job="ifw"' in a["expr"] and "namespace=" not in a["expr"] for a in alerts.values())
    assert alerts["IfwPoolAssignmentStuck"]["expr"].endswith("> 1200")
    assert alerts["IfwGateway5xx"]["annotations"]["runbook_url"] == "https://runbooks.example.com/ifw#ifwgateway5xx"


def test_the_schema_refuses_an_unknown_alert_name(helm):
    result = helm.run("template", "ifw", str(CHART), *RULE, "--set-json", 'metrics.prometheusRule.disabled=["Nope"]',
                      check=False)  # fmt: skip
    assert result.returncode != 0 and "disabled" in result.stderr
