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
    ifw local --serve --allow-webhook-host 127.0.0.1 --allow-media-host 10.0.0.0/8

It supervises what it starts: the operator, the gateway or a pool worker that exits is started
again after a back-off (1 s, doubling to 60 s while it keeps failing; back to 1 s once it ran
for 2 minutes), each restart logged. SIGTERM, SIGINT (Ctrl-C) and its own death stop every
process it started: the first two in order (gateway, runners, operator, control plane), the
last by the kernel (each child asked for SIGTERM when its parent dies, PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from ifw.core.netguard import Allowlist
from ifw.core.runner_settings import RunnerSettings, WorkerSettings
from ifw.local.control_plane import ControlPlane, die_with_parent
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


# A child that exits is started again after BACKOFF_BASE_SECONDS, doubling with each exit in a
# row up to BACKOFF_CAP_SECONDS; one that ran BACKOFF_RESET_SECONDS before it exited starts the
# count again (the kubelet's CrashLoopBackOff, shorter: a local stack wants its pieces back soon).
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 60.0
BACKOFF_RESET_SECONDS = 120.0
# Auto jobs that find no ready pool worker wait this long for one (a worker restarting after a
# crash loads its model) before they run in their own Job.
POOL_WAIT_SECONDS = 30.0


def _log(message: str) -> None:
    print(f"[ifw-local] {message}", file=sys.stderr, flush=True)


@dataclass
class Child:
    """A process the stack started, and what it takes to start it again."""

    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen
    started: float  # time.monotonic() of the last start
    restarts: int = 0
    failures: int = 0  # exits in a row, each after less than BACKOFF_RESET_SECONDS: the back-off's exponent
    restart_at: float | None = None  # set while it waits out its back-off

    def backoff(self, ran: float) -> float:
        if ran >= BACKOFF_RESET_SECONDS:
            self.failures = 0
        delay = min(BACKOFF_BASE_SECONDS * 2**self.failures, BACKOFF_CAP_SECONDS)
        self.failures += 1
        return delay


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
                 webhook_allowlist: list[str] | None = None, media_allowlist: list[str] | None = None,
                 ready_timeout: float = 600.0, state_dir: Path | None = None,
                 pool_wait_seconds: float = POOL_WAIT_SECONDS):  # fmt: skip
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
        # The runner's fetch allowlist, and so the gateway's url check: the gateway's own uploads on
        # loopback, and private media hosts the user allows.
        self.fetch_allowlist = ["127.0.0.1", *(media_allowlist or [])]
        self.pool_wait_seconds = pool_wait_seconds
        self.children: dict[str, Child] = {}
        self._lock = threading.Lock()  # a restart and stop() do not interleave
        self._stopping = threading.Event()  # no more restarts
        self._stopped = threading.Event()  # stop() is done
        self._supervisor: threading.Thread | None = None
        self.worker_health_ports: list[int] = []  # each pool worker's /healthz, /readyz, /metrics
        self.gateway_url = ""
        self.kubeconfig = ""

    @property
    def processes(self) -> list[subprocess.Popen]:
        """The current process of each child (a restarted one's newest)."""
        return [child.process for child in list(self.children.values())]

    def _spawn(self, name: str, module: str, env: dict[str, str], *args: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", module, *args]
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, **env}
        child = Child(name, argv, env, self._popen(name, argv, env), time.monotonic())
        self.children[name] = child
        return child.process

    def _popen(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        # Its own session: a Ctrl-C in the terminal reaches only `ifw local`, which stops the
        # children in order. PR_SET_PDEATHSIG: killed with `ifw local` even by SIGKILL. The kernel
        # sends it when the forking *thread* ends, so only the main thread and the supervisor
        # (which lives until stop()) ask for it.
        dies_with_us = threading.current_thread() in (threading.main_thread(), self._supervisor)
        with open(self.work / f"{name}.log", "ab") as log:  # append: a restarted child keeps its earlier log
            return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.work, start_new_session=True,
                                    preexec_fn=die_with_parent if dies_with_us else None)  # fmt: skip

    # ------------------------------------------------------------------ supervision

    def supervise(self) -> None:
        """Start the supervisor: a child that exits is started again after its back-off."""
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, name="ifw-local-supervisor", daemon=True)
            self._supervisor.start()

    def stop_supervising(self) -> None:
        """No more restarts (stop() does this first); the children are left running."""
        self._stopping.set()
        with self._lock:  # a restart under way has finished
            pass

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            for child in list(self.children.values()):
                with self._lock:
                    if self._stopping.is_set():
                        break
                    self._look_after(child, time.monotonic())
        # The children this thread restarted get their SIGTERM when it ends (PR_SET_PDEATHSIG is
        # per thread): it ends with the process, or once stop() has stopped them anyway.
        self._stopped.wait()

    def _look_after(self, child: Child, now: float) -> None:
        code = child.process.poll()
        if code is None:
            return
        if child.restart_at is None:
            ran = now - child.started
            delay = child.backoff(ran)
            child.restart_at = now + delay
            _log(f"{child.name} (pid {child.process.pid}) exited with code {code} after {ran:.0f}s; "
                 f"restarting it in {delay:g}s (restart {child.restarts + 1}; log {self.work / child.name}.log)")
        elif now >= child.restart_at:
            try:
                child.process = self._popen(child.name, child.argv, child.env)
            except OSError as error:
                _log(f"could not restart {child.name}: {error}")
                child.restart_at = None  # counts as another exit: a longer back-off
                return
            child.started, child.restart_at = now, None
            child.restarts += 1
            _log(f"{child.name} restarted (pid {child.process.pid})")

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

    def operator_config(self, runner_env: dict[str, str], *, liveness_port: int, metrics_port: int) -> dict:
        """The operator's settings (its config file), as the chart's values would make them."""
        return {
            "namespaces": [self.namespace],
            "default_model": self.model,
            "max_active_jobs": 1,  # one machine, one model at a time in Job mode
            "liveness_port": liveness_port,
            "metrics_port": metrics_port,
            "log_format": "plain",
            "resync_interval_seconds": 2,
            "runner": {"env": runner_env},
            "webhook": {"allowlist": self.webhook_allowlist},
            # An Auto job that finds no ready pool worker (one restarting after a crash) waits this
            # long for one, then runs in its own Job: bounded, and no second copy of the model at once.
            "pool": {"wait_seconds": self.pool_wait_seconds},
        }

    def start(self, control_plane: ControlPlane) -> None:
        self.kubeconfig = control_plane.kubeconfig
        if self.state_dir:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        install_crd(control_plane_client(self.kubeconfig))
        runner_env = self.runner_env()
        operator_config = self.operator_config(runner_env, liveness_port=_free_port(), metrics_port=_free_port())
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
        self.supervise()  # from here on, a child that exits is started again

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
        """Stop every child, in order: the gateway (no new requests), the runners (pool workers
        drain and hand back what they hold while the apiserver still answers), the operator.
        The control plane is the caller's (ControlPlane's exit, after this)."""
        self.stop_supervising()
        with self._lock:
            self._terminate([c for c in self.children.values() if c.name == "gateway"])
            if getattr(self, "node", None):
                self.node.stop()
            self._terminate([c for c in self.children.values() if c.name.startswith("worker-")], timeout=30)
            self._terminate(list(self.children.values()))
        self._stopped.set()

    @staticmethod
    def _terminate(children: list[Child], timeout: float = 15) -> None:
        for child in children:
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + timeout
        for child in children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _log(f"{child.name} (pid {child.process.pid}) ignored SIGTERM for {timeout:g}s; killing it")
                child.process.kill()
                child.process.wait()


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


def _host_or_cidr(value: str) -> str:
    """An allowlist entry as the SSRF guard reads it: a hostname, `*.suffix`, an address or a CIDR."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty host")
    try:
        Allowlist([value])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value.strip()


class Stopped(BaseException):
    """SIGTERM or SIGINT: unwinds the main thread through every `finally`, which stop the stack."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> None:
    def on_signal(signum, frame):
        # Once: the second signal during the orderly stop is ignored (the children still die with
        # this process if it is killed meanwhile).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _log(f"{signal.Signals(signum).name}: stopping every process of the stack")
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _serve_until_stopped(control_plane: ControlPlane) -> int:
    """Wait for a signal; the control plane's etcd or apiserver exiting ends the stack (with
    --state-dir a restart, e.g. the container's restart policy, finds everything again)."""
    while True:
        for name, process, _ in list(control_plane._procs):
            if process.poll() is not None:
                _log(f"{name} exited with code {process.returncode}: the stack cannot go on without it")
                return 1
        time.sleep(1)


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
    parser.add_argument("--allow-media-host", action="append", default=[], type=_host_or_cidr,
                        metavar="HOST_OR_CIDR",
                        help="a loopback or private host (or `*.suffix`, an address, a CIDR) that audio URLs may "
                             "name; public hosts need none. Repeatable")  # fmt: skip
    parser.add_argument("--allow-webhook-host", action="append", default=[], type=_host_or_cidr,
                        metavar="HOST_OR_CIDR",
                        help="a loopback or private host (or `*.suffix`, an address, a CIDR) that webhooks may "
                             "call; public hosts need none. Repeatable")  # fmt: skip
    parser.add_argument("--pool-wait-seconds", type=float, default=POOL_WAIT_SECONDS,
                        help="how long a job waits for a ready pool worker (one restarting after a crash) before "
                             f"it runs in its own runner process; default {POOL_WAIT_SECONDS:g}")  # fmt: skip
    args = parser.parse_args(argv)
    if args.pool_wait_seconds < 0:
        parser.error("--pool-wait-seconds must not be negative")

    work = Path(tempfile.mkdtemp(prefix="ifw-local-stack-"))
    stack = LocalStack(work, args.model, pool_workers=1 if args.runtime == "pool" else 0, device=args.device,
                       host=args.host, port=args.port, ready_timeout=args.ready_timeout, state_dir=args.state_dir,
                       webhook_allowlist=args.allow_webhook_host, media_allowlist=args.allow_media_host,
                       pool_wait_seconds=args.pool_wait_seconds)  # fmt: skip
    print(f"local stack: logs in {work}", flush=True)
    _stop_on_signals()
    code = 1
    try:
        with ControlPlane(etcd_data_dir=args.state_dir / "etcd" if args.state_dir else None) as control_plane:
            try:
                stack.start(control_plane)
                if args.serve:
                    print(f"\nexport KUBECONFIG={stack.kubeconfig}\ngateway: {stack.gateway_url}  (docs at /docs)\n"
                          "Ctrl-C stops everything.", flush=True)
                    code = _serve_until_stopped(control_plane)
                    return code
                audio = args.audio or _say(SAMPLE_TEXT, work / "sample.wav")
                code = demo(stack, audio, args.timestamp, args.diarize)
                return code
            finally:
                stack.stop()
    except Stopped as stopped:
        # Asked to stop: --serve's way to end, so a success there; an interrupted demo is not.
        code = 0 if args.serve else 128 + stopped.signum
        return code
    finally:
        if code == 0 and not args.serve:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
