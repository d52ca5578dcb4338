"""Every IFW_* name the chart renders or spells is one the reading component's settings class reads.

The settings classes ignore unknown variables, so a misspelt name in a template would silently
leave a setting at its default. The code that sets env (operator/jobs.py, local/stack.py) asks
the classes for the names (``env_var``); the chart cannot, so this test holds it to them.
"""

from __future__ import annotations

import re

import pytest
from pydantic import AliasChoices, BaseModel

from ifw.core.results import ResultSettings
from ifw.core.runner_settings import RunnerSettings, WorkerSettings
from ifw.core.settings import EnvNamed
from ifw.gateway.config import GatewaySettings
from ifw.operator.config import CONFIG_FILE_ENV, OperatorSettings
from ifw.operator.jobs import runner_job
from tests.helm.conftest import CHART
from tests.helm.test_chart import MINIO, RELEASE, container, load_operator_settings, operator_yaml
from tests.helm.test_pool import POOL, TJ, pool_container

# Every optional env on: the pool, S3 results, diarization with a hub token, allowed models, the
# runner's own env, and each optional gateway and operator setting.
ALL_ON = (*POOL, *MINIO, "--set", "results.secretMaxBytes=500000",
          "--set", "diarization.enabled=true", "--set", "diarization.hfTokenSecret.name=hf",
          "--set-json", 'operator.allowedModels=["base"]', "--set-string", "runner.env.IFW_CPU_THREADS=4",
          "--set", "gateway.auth.adminKey=k", "--set-json", 'gateway.auth.tenantKeys={"team-a":"k1"}',
          "--set", "gateway.defaultModel=base", "--set", "gateway.queueName=gpu",
          "--set", "gateway.activeDeadlineSeconds=3600", "--set", "gateway.ttlSecondsAfterFinished=0",
          "--set", "gateway.syncTimeoutSeconds=600", "--set", "operator.webhook.signingSecret=whsec_a2V5")
RUNNER = (RunnerSettings, ResultSettings)
WORKER = (*RUNNER, WorkerSettings)
GATEWAY = (GatewaySettings, ResultSettings)
# The cleanup hook's own variables, read by files/cleanup.py (no settings class).
CLEANUP = {"IFW_CLEANUP_NAMESPACES", "IFW_CLEANUP_DELETE"}


def names(*classes: type[EnvNamed]) -> set[str]:
    """The names the classes take their fields from (each field's canonical one)."""
    return {cls.env_var(field) for cls in classes for field in cls.model_fields}


def every_name(*classes: type[EnvNamed]) -> set[str]:
    """Also the other choices of an alias (IFW_HF_TOKEN, ...): names the classes read too."""
    found = names(*classes)
    for cls in classes:
        for info in cls.model_fields.values():
            if isinstance(info.validation_alias, AliasChoices):
                found |= set(info.validation_alias.choices)
    return found


def unknown(env: list[dict] | dict, classes) -> set[str]:
    """The IFW_* names in an env list or dict that none of the classes reads."""
    listed = [e["name"] for e in env] if isinstance(env, list) else list(env)
    return {n for n in listed if n.upper().startswith("IFW_")} - names(*classes)


def operator_reads(name: str) -> bool:
    """OperatorSettings reads IFW_OPERATOR_<field>[__<field>...] (nested), and its file's name."""
    if name == CONFIG_FILE_ENV:
        return True
    if not name.startswith("IFW_OPERATOR_"):
        return False
    model: type[BaseModel] | None = OperatorSettings
    for part in name.removeprefix("IFW_OPERATOR_").lower().split("__"):
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return True


@pytest.fixture(scope="module")
def all_on(helm):
    return helm.template(*ALL_ON)


def test_the_pool_workers_env_is_the_worker_and_runner_settings(all_on):
    env = pool_container(all_on)["env"]
    assert unknown(env, WORKER) == set()
    assert {"IFW_WORKER_NAME", "IFW_NODE_NAME", "IFW_DIARIZATION_PIPELINE", "IFW_S3_BUCKET"} <= {e["name"] for e in env}


def test_the_runner_env_the_operator_passes_is_the_runner_settings(all_on, tmp_path, monkeypatch):
    runner_env = operator_yaml(all_on)["runner"]["env"]
    assert unknown(runner_env, RUNNER) == set()
    assert {"IFW_CPU_THREADS", "IFW_ALLOWED_MODELS", "IFW_FETCH_ALLOWLIST"} <= set(runner_env)
    job = runner_job(TJ, load_operator_settings(tmp_path, monkeypatch, all_on))
    assert unknown(job["spec"]["template"]["spec"]["containers"][0]["env"], RUNNER) == set()


def test_the_operators_own_env_is_its_settings(all_on):
    env = [e["name"] for e in container(all_on, "Deployment", f"{RELEASE}-operator")["env"]]
    assert "IFW_OPERATOR_WEBHOOK__SIGNING_SECRET" in env
    assert [n for n in env if not operator_reads(n) and n not in names(ResultSettings)] == []


def test_the_gateway_env_is_the_gateway_settings(all_on):
    env = container(all_on, "Deployment", f"{RELEASE}-gateway")["env"]
    assert unknown(env, GATEWAY) == set()
    assert {"IFW_GATEWAY_TENANT_KEYS", "IFW_GATEWAY_SYNC_TIMEOUT_SECONDS"} <= {e["name"] for e in env}


def test_every_name_the_templates_spell_is_read():
    """Names in lists and checks too ($reserved, the one-source refusals), not only rendered env."""
    read = every_name(*WORKER, GatewaySettings) | CLEANUP | {CONFIG_FILE_ENV, "IFW_OPERATOR_WEBHOOK__SIGNING_SECRET"}
    spelt = {
        (path.name, name)
        for path in (CHART / "templates").iterdir()
        for name in re.findall(r"\bIFW_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())
    }
    assert {(file, name) for file, name in spelt if name not in read} == set()
    cleanup = (CHART / "files" / "cleanup.py").read_text()
    assert all(name in cleanup for name in CLEANUP)


def test_a_misspelt_name_is_caught(helm):
    objects = helm.template(*POOL, "--set-string", "runner.env.IFW_CPU_THREAD=4")
    assert unknown(pool_container(objects)["env"], WORKER) == {"IFW_CPU_THREAD"}
    with pytest.raises(KeyError, match="cpu_thread"):
        RunnerSettings.env_var("cpu_thread")


def test_the_local_stacks_gateway_env_is_the_gateway_settings(tmp_path, monkeypatch):
    """The local stack may not import the gateway, so it spells the gateway's names: held here."""
    from ifw.local.stack import LocalStack

    env = LocalStack(tmp_path, "base", webhook_allowlist=["10.0.0.0/8"]).gateway_settings_env(8123)
    assert unknown(env, GATEWAY) == set()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = GatewaySettings()
    assert (settings.port, settings.url_allowlist, settings.webhook_allowlist) == (8123, ["127.0.0.1"], ["10.0.0.0/8"])


def test_env_renders_values_the_class_reads_back(monkeypatch):
    from pathlib import Path

    from ifw.core.settings import field_ref

    values = {"cpu_int8": True, "cpu_threads": 2, "fetch_allowlist": ["127.0.0.1"], "work_dir": Path("/w")}
    env = RunnerSettings.env(**values)
    assert env["IFW_CPU_INT8"] == "true" and env["IFW_FETCH_ALLOWLIST"] == '["127.0.0.1"]'
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert RunnerSettings().model_dump(include=set(values)) == values
    assert RunnerSettings.k8s_env(job_uid="u", node_name=field_ref("spec.nodeName")) == [
        {"name": "IFW_JOB_UID", "value": "u"},
        {"name": "IFW_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]
    assert WorkerSettings.env_var("node_name") == "IFW_WORKER_NODE_NAME"  # an alias's first choice
