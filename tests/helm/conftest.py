"""Fixtures for the Helm chart tests: the real helm binary and rendering helpers.

helm comes from .ci/install-helm.sh (.venv/bin/helm). A missing binary FAILS the tests: the
chart is part of the product, a machine without helm cannot vouch for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "ifw"
GPU_VALUES = CHART / "ci" / "gpu-production-values.yaml"


def find_helm() -> str:
    """.venv/bin/helm (next to this interpreter), else helm on PATH; fail loudly otherwise."""
    candidates = [Path(sys.executable).parent / "helm", ROOT / ".venv" / "bin" / "helm"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("helm")
    if found:
        return found
    pytest.fail("helm not found in .venv/bin or on PATH: run `bash .ci/install-helm.sh`", pytrace=False)


class Helm:
    def __init__(self, binary: str, home: Path):
        self.binary = binary
        # Private config/cache/data dirs: no repos or plugins of the machine's user leak in.
        self.env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str, check: bool = True, kubeconfig: str | None = None) -> subprocess.CompletedProcess:
        env = dict(self.env)
        if kubeconfig:
            env["KUBECONFIG"] = kubeconfig
        proc = subprocess.run([self.binary, *args], capture_output=True, text=True, env=env, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def template(self, *args: str, release: str = "ifw", namespace: str = "ifw-system") -> list[dict[str, Any]]:
        """Render the chart; return every object (documents that are empty are dropped)."""
        out = self.run("template", release, str(CHART), "--namespace", namespace, *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    return Helm(find_helm(), tmp_path_factory.mktemp("helm-home"))


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload object."""
    specs = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
        elif o["kind"] == "CronJob":
            specs.append((f"CronJob/{o['metadata']['name']}", o["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            specs.append((f"Pod/{o['metadata']['name']}", o["spec"]))
    return specs
