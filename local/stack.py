"""The whole system on one machine: `ifw local`, the main job of `make demo`.

Starts a real kube-apiserver + etcd (ifw.local.control_plane), installs the
TranscriptionJob CRD, runs the operator and the gateway as processes exactly as
their images would (`python -m ifw.operator`, `python -m ifw.gateway`), and the
kubelet stand-in (ifw.local.standin) that runs each runner Job as a local
process. Then it speaks a sample with espeak-ng (or takes --audio), posts it to
the gateway's original REST API, prints the answer and `kubectl get tj`, and
tears everything down.

    ifw local                                      # demo, then exit
    ifw local --serve                              # keep the stack up, print how to use it
    ifw local --audio talk.mp3 --model tiny.en --timestamp word
    ifw local --serve --state-dir ~/.local/state/ifw   # jobs and results survive a restart
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from ifw.core.runner_settings import RunnerSettings, WorkerSettings
from ifw.local.control_plane import ControlPlane
from ifw.local.crd import install_crd
from ifw.local.standin import KubeletStandIn

SAMPLE_TEXT = (
    "Insanely fast whisper now runs on Kubernetes. "
    "Every transcription is a resource that you can apply, watch and delete."
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(text: str, path: Path) -> Path:
    if not shutil.which("espeak-ng"):
        raise SystemExit("espeak-ng is needed for the sample: apt-get install espeak-ng (or pass --audio)")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(path), text], check=True)
    return path


def _wait_http(url: str, process: subprocess.Popen, name: str, timeout: float = 90.0, hint: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with code {process.returncode}; see its log")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit(f"{name} not ready at {url} within {timeout:g}s{hint}")


class LocalStack:
    """The processes of ifw on one machine, configured like the chart configures a cluster.

    ``pool_workers``: warm runner workers (pool mode, the default: one, as a single GPU
    serves); 0 runs every job in its own Job through the kubelet stand-in. ``device``: what the
    runners use (auto: CUDA when visible). ``host``/``port``: where the gateway listens
    (0.0.0.0:8000 is the original API's). ADMIN_KEY and HF_TOKEN in the environment work as
    for the original: the API key, and diarization with pyannote's hub pipeline.
    """

    def __init__(self, work: Path, model: str, namespace: str = "default", gateway_kubeconfig: str | None = None,
                 gateway_env: dict[str, str] | None = None, *, pool_workers: int = 1, device: str = "cpu",
                 host: str = "127.0.0.1", port: int | None = None,
                 webhook_allowlist: list[str] | None = None, ready_timeout: float = 600.0,
                 state_dir: Path | None = None):  # fmt: skip
        self.work = work
        # What must outlive a restart besides etcd's data (the ControlPlane's): the uploads that
        # queued jobs will fetch, and the gateway's port that their URLs name.
        self.state_dir = state_dir
        self.model = model
        self.namespace = namespace
        # The gateway's identity (default: the admin kubeconfig) and extra IFW_GATEWAY_* settings.
        self.gateway_kubeconfig = gateway_kubeconfig
        self.gateway_env = gateway_env or {}
        self.pool_workers = pool_workers
        self.device = device
        self.host = host
        self.port = port
        self.ready_timeout = ready_timeout  # how long a pool worker may take to load its model
        # Private webhook receivers the operator may call (and the gateway accept), e.g. on loopback.
        self.webhook_allowlist = webhook_allowlist or []
        self.fetch_allowlist = ["127.0.0.1"]  # the runner's, and so the gateway's url check
        self.processes: list[subprocess.Popen] = []
        self.worker_health_ports: list[int] = []  # each pool worker's /healthz, /readyz, /metrics
        self.gateway_url = ""
        self.kubeconfig = ""

    def _spawn(self, name: str, module: str, env: dict[str, str], *args: str) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env={**os.environ, "KUBECONFIG": self.kubeconfig, **env},
            stdout=log, stderr=subprocess.STDOUT, cwd=self.work, start_new_session=True,
        )
        self.processes.append(process)
        return process

    def runner_env(self) -> dict[str, str]:
        """The runner's settings, the same for a Job's pod and a pool worker."""
        env = RunnerSettings.env(
            device=self.device,
            default_model=self.model,
            # HF_TOKEN alone turns diarization on, as in the original; else the packaged weights.
            diarization_pipeline="pyannote/speaker-diarization-3.1" if os.environ.get("HF_TOKEN") else "packaged",
            # The gateway serves uploads to the runner on loopback here.
            fetch_allowlist=self.fetch_allowlist,
        )
        env |= {"PYANNOTE_METRICS_ENABLED": "0", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        if self.device == "cpu":  # two shared cores: pinned threads, or some ops run 10x slower
            env |= RunnerSettings.env(cpu_threads=2) | {"OMP_NUM_THREADS": "2"}
        return env

    def start(self, control_plane: ControlPlane) -> None:
        self.kubeconfig = control_plane.kubeconfig
        if self.state_dir:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        install_crd(control_plane_client(self.kubeconfig))
        runner_env = self.runner_env()
        operator_config = {
            "namespaces": [self.namespace],
            "default_model": self.model,
            "max_active_jobs": 1,  # one machine, one model at a time in Job mode
            "liveness_port": _free_port(),
            "metrics_port": _free_port(),
            "log_format": "plain",
            "resync_interval_seconds": 2,
            "runner": {"env": runner_env},
            "webhook": {"allowlist": self.webhook_allowlist},
        }
        config_path = self.work / "operator.yaml"
        config_path.write_text(yaml.safe_dump(operator_config))
        operator = self._spawn("operator", "ifw.operator", {"IFW_OPERATOR_CONFIG_FILE": str(config_path)})

        port = self.port or self._gateway_port()
        reach = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        self.gateway_url = f"http://{reach}:{port}"
        gateway = self._spawn("gateway", "ifw.gateway", {
            **self.gateway_settings_env(port),
            **self.gateway_env,
            **({"KUBECONFIG": self.gateway_kubeconfig} if self.gateway_kubeconfig else {}),
        })
        # Runner processes act as their pod's ServiceAccount (the operator's least-privilege Role).
        credentials = control_plane.service_account_kubeconfig if control_plane.can_mint else None
        self.node = KubeletStandIn(self.kubeconfig, log_dir=self.work / "pods", credentials=credentials)
        self.node.start()
        workers = [self._start_worker(i, runner_env) for i in range(self.pool_workers)]
        _wait_http(f"http://127.0.0.1:{operator_config['liveness_port']}/healthz", operator, "operator")
        _wait_http(f"{self.gateway_url}/readyz", gateway, "gateway")
        for process, health in workers:  # warm: the model is loaded before the first job comes
            _wait_http(f"http://127.0.0.1:{health}/readyz", process, "pool worker", timeout=self.ready_timeout,
                       hint=" (loading its model; a slow first download needs a longer --ready-timeout)")

    def gateway_settings_env(self, port: int) -> dict[str, str]:
        """The gateway's settings. Spelt here (the local stack may not import the gateway); a test
        checks each name against GatewaySettings."""
        return {
            "IFW_GATEWAY_HOST": self.host,
            "IFW_GATEWAY_PORT": str(port),
            "IFW_GATEWAY_NAMESPACE": self.namespace,
            "IFW_GATEWAY_INTERNAL_URL": f"http://127.0.0.1:{port}",
            "IFW_GATEWAY_UPLOAD_DIR": str((self.state_dir or self.work) / "uploads"),
            "IFW_GATEWAY_DIARIZATION_AVAILABLE": "true",
            "IFW_GATEWAY_LOG_FORMAT": "text",
            # The same lists the runner's fetch and the operator's webhook sender apply.
            "IFW_GATEWAY_URL_ALLOWLIST": json.dumps(self.fetch_allowlist),
            "IFW_GATEWAY_WEBHOOK_ALLOWLIST": json.dumps(self.webhook_allowlist),
        }

    def _gateway_port(self) -> int:
        """A free port; with a state directory the one used last time (upload URLs of queued jobs name it)."""
        if self.state_dir is None:
            return _free_port()
        remembered = self.state_dir / "gateway-port"
        if remembered.exists():
            port = int(remembered.read_text())
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
                try:
                    s.bind((self.host, port))
                    return port
                except OSError:
                    print(f"port {port} of the last run is taken: uploads queued then cannot be fetched",
                          file=sys.stderr)  # fmt: skip
        port = _free_port()
        remembered.write_text(str(port))
        return port

    def _start_worker(self, index: int, runner_env: dict[str, str]) -> tuple[subprocess.Popen, int]:
        """A pool worker, as the chart's pool Deployment runs it (`ifw-runner serve`)."""
        health = _free_port()
        self.worker_health_ports.append(health)
        process = self._spawn(f"worker-{index}", "ifw.runner", {
            **runner_env,
            **WorkerSettings.env(name=f"local-worker-{index}", namespace=self.namespace,
                                 watch_namespaces=[self.namespace], health_port=health),
            # The runner's name, which the worker reads too: as the chart sets it.
            **RunnerSettings.env(node_name=socket.gethostname()),
        }, "serve")
        return process, health

    def stop(self) -> None:
        if getattr(self, "node", None):
            self.node.stop()
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def control_plane_client(kubeconfig: str):
    from ifw.core import kube

    return kube.api_client(kubeconfig=kubeconfig, component="local-stack")


def demo(stack: LocalStack, audio: Path, timestamp: str, diarize: bool) -> int:
    form = {"timestamp": timestamp, "diarise_audio": str(diarize).lower()}
    print(f"POST {stack.gateway_url}/  (upload {audio.name}, timestamp={timestamp}, diarise_audio={diarize})",
          flush=True)
    started = time.monotonic()
    with httpx.Client(base_url=stack.gateway_url, timeout=900) as http:
        response = http.post("/", data=form, files={"file": (audio.name, audio.read_bytes())})
        print(f"-> HTTP {response.status_code} in {time.monotonic() - started:.1f}s")
        print(json.dumps(response.json(), indent=2, ensure_ascii=False))
        if response.status_code != 200:
            return 1
        task_id = response.json()["task_id"]
        status = http.get(f"/status/{task_id}").json()
        print(f"GET /status/{task_id} -> status={status.get('status')} language={status.get('language')}")
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if kubectl:
        subprocess.run([kubectl, "--kubeconfig", stack.kubeconfig, "get", "tj", "-n", stack.namespace, "-o", "wide"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ifw local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="keep the stack running until Ctrl-C")
    parser.add_argument("--audio", type=Path, help="audio file to transcribe (default: a spoken sample)")
    parser.add_argument("--model", default="base", help="runner model: packaged 'base' or 'tiny.en', or a path")
    parser.add_argument("--timestamp", choices=["chunk", "word"], default="chunk")
    parser.add_argument("--diarize", action="store_true", help="split by speaker (packaged pyannote weights)")
    parser.add_argument("--runtime", choices=["pool", "job"], default="pool",
                        help="pool: one warm worker holds the model (default); job: a runner process per job")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                        help="what the runners use (auto: CUDA when visible)")
    parser.add_argument("--host", default="127.0.0.1", help="where the gateway listens (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, help="the gateway's port (default: a free one; the original's is 8000)")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds the pool worker may take to load its model (a first download of large-v3 "
                             "on a slow link needs more; default 600)")  # fmt: skip
    parser.add_argument("--state-dir", type=Path,
                        help="keep jobs, statuses, results and queued uploads here across restarts (etcd's data "
                             "and the uploads); default: they last as long as the process")  # fmt: skip
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ifw-local-stack-"))
    stack = LocalStack(work, args.model, pool_workers=1 if args.runtime == "pool" else 0, device=args.device,
                       host=args.host, port=args.port, ready_timeout=args.ready_timeout, state_dir=args.state_dir)
    print(f"local stack: logs in {work}", flush=True)
    code = 1
    try:
        with ControlPlane(etcd_data_dir=args.state_dir / "etcd" if args.state_dir else None) as control_plane:
            try:
                stack.start(control_plane)
                if args.serve:
                    print(f"\nexport KUBECONFIG={stack.kubeconfig}\ngateway: {stack.gateway_url}  (docs at /docs)\n"
                          "Ctrl-C stops everything.", flush=True)
                    with contextlib.suppress(KeyboardInterrupt):
                        while True:
                            time.sleep(3600)
                    return 0
                audio = args.audio or _say(SAMPLE_TEXT, work / "sample.wav")
                code = demo(stack, audio, args.timestamp, args.diarize)
                return code
            finally:
                stack.stop()
    finally:
        if code == 0 and not args.serve:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
