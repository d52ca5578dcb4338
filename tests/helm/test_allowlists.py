"""One allowlist per destination: the gateway's early check of `url` uses the very list the
runners fetch with (IFW_FETCH_ALLOWLIST) and its check of `webhook.url` the list the operator
posts webhooks with (operator.webhook.allowlist), in every rendering of the chart; so the
gateway never accepts a URL that the component making the connection will refuse."""

from __future__ import annotations

import json
import os

import pytest

from ifw.gateway.config import GatewaySettings
from tests.helm.conftest import CHART, GPU_VALUES
from tests.helm.test_chart import NS, RELEASE, container, load_operator_settings

GATEWAY_SVC = f"{RELEASE}-gateway.{NS}.svc"

RENDERINGS = {
    # (helm arguments, the runners' list, the operator's webhook list)
    "defaults": ((), [GATEWAY_SVC], []),
    "webhook allowlist": (("--set-json", 'operator.webhook.allowlist=["10.0.0.0/8","hooks.corp.internal"]'),
                          [GATEWAY_SVC], ["10.0.0.0/8", "hooks.corp.internal"]),
    "runner fetch allowlist": (("--set-json", 'runner.env={"IFW_FETCH_ALLOWLIST":"[\\"minio.store.svc\\",\\"10.1.0.0/16\\"]"}'),
                               ["minio.store.svc", "10.1.0.0/16"], []),
    "operator extraConfig wins": (("--set-json", 'operator.webhook.allowlist=["10.0.0.0/8"]',
                                   "--set-json", 'operator.extraConfig={"webhook":{"allowlist":["172.16.0.0/12"]}}'),
                                  [GATEWAY_SVC], ["172.16.0.0/12"]),
    "uploads off": (("--set", "gateway.uploads.enabled=false"), [], []),
    "gpu production + pool": (("-f", str(GPU_VALUES), "--set", "pool.enabled=true", "--set-json",
                               'operator.watchNamespaces=["team-a"]', "--set", "metrics.serviceMonitor.enabled=false"),
                              None, None),
}  # fmt: skip


def _gateway_settings(objects, monkeypatch) -> GatewaySettings:
    env = {e["name"]: e for e in container(objects, "Deployment", f"{RELEASE}-gateway")["env"]}
    for key in list(os.environ):
        if key.startswith("IFW_GATEWAY_") or key in ("ADMIN_KEY", "HF_TOKEN"):
            monkeypatch.delenv(key)
    for name, e in env.items():
        monkeypatch.setenv(name, e.get("value", "from-a-secret"))
    return GatewaySettings()


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_the_gateway_checks_with_the_lists_the_runner_and_operator_enforce(helm, tmp_path, monkeypatch, name):
    args, fetch, webhook = RENDERINGS[name]
    objects = helm.template(*args)
    operator = load_operator_settings(tmp_path, monkeypatch, objects)
    runner_list = json.loads(operator.runner.env.get("IFW_FETCH_ALLOWLIST", "[]"))
    gateway = _gateway_settings(objects, monkeypatch)

    assert gateway.url_allowlist == runner_list
    assert gateway.webhook_allowlist == operator.webhook.allowlist
    if fetch is not None:  # and they are what was asked for, not merely equal
        assert runner_list == fetch and operator.webhook.allowlist == webhook
    pools = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-pool")]
    for pool in pools:  # warm workers fetch with the same list as Job runners
        env = {e["name"]: e.get("value") for e in pool["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert json.loads(env.get("IFW_FETCH_ALLOWLIST", "[]")) == gateway.url_allowlist
    if name == "gpu production + pool":
        assert pools, "the pool rendering has no pool Deployment"


def test_a_separate_gateway_url_allowlist_is_refused_loudly(helm):
    """The old gateway.urlAllowlist could disagree with the runners: setting it fails the render, naming
    the settings that decide instead."""
    proc = helm.run("template", RELEASE, str(CHART), "--set-json", 'gateway.urlAllowlist=["10.0.0.0/8"]',
                    check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "gateway.urlAllowlist is no longer read" in proc.stderr
    assert "runner.env.IFW_FETCH_ALLOWLIST" in proc.stderr and "operator.webhook.allowlist" in proc.stderr
