"""Control-plane benchmark: how fast the operator turns TranscriptionJobs into runner Jobs.

Against the real test kube-apiserver (ifw.local.control_plane.ControlPlane), with the
operator as its own process (``python -m ifw.operator``, as deployed):

1. create N TranscriptionJobs (default 500) from a few client threads, as fast as the API
   takes them (``--rate`` paces them instead);
2. watch the runner Jobs appear;
3. report p50/p99 of TranscriptionJob created (the create call returned) -> Job created (the
   watch delivered it), the time until all N have Jobs, and the operator's RSS.

    .venv/bin/python -m bench.control_plane [--jobs 500] [--rate 0] [--threads 4]
    .venv/bin/python -m bench.control_plane --quick      # 20 jobs: seconds (CI)

Targets (2 cores): p50 <= 100 ms, p99 <= 500 ms, 500 jobs <= 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.procstats import cpu_seconds, free_port, percentile, rss_kib  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.control_plane")
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--threads", type=int, default=4, help="client threads creating TranscriptionJobs")
    ap.add_argument("--rate", type=float, default=0, help="TranscriptionJobs per second (0: as fast as possible)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--wrap", default="", help="prefix for the operator command, e.g. 'py-spy record -o p.svg --'")
    ap.add_argument("--quick", action="store_true", help="a CI-sized run: 20 jobs")
    ap.add_argument("--audit", action="store_true",
                    help="turn the apiserver's audit log on and count the operator's requests per job (costs CPU)")
    args = ap.parse_args(argv)
    if args.quick:
        args.jobs = 20

    from ifw.local.control_plane import ControlPlane

    audit_log = Path(tempfile.mkdtemp(prefix="ifw-bench-audit-")) / "audit.log" if args.audit else None
    with ControlPlane(audit_log=audit_log) as cp:
        os.environ["KUBECONFIG"] = cp.kubeconfig
        from kubernetes import client, config, watch

        from ifw.crds.transcriptionjob import API_VERSION, GROUP, KIND, PLURAL, VERSION
        from ifw.local.crd import install_crd

        api = config.new_client_from_config(config_file=cp.kubeconfig)
        install_crd(api)
        ns = "bench"
        client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})

        log = Path(tempfile.mkdtemp(prefix="ifw-bench-")) / "operator.log"
        metrics_port = free_port()
        env = {
            **os.environ,
            "IFW_OPERATOR_NAMESPACES": json.dumps([ns]),
            "IFW_OPERATOR_MAX_ACTIVE_JOBS": str(args.jobs * 2),
            "IFW_OPERATOR_METRICS_PORT": str(metrics_port),
            "IFW_OPERATOR_LIVENESS_PORT": str(free_port()),
            "IFW_OPERATOR_LOG_FORMAT": "json",
            "IFW_OPERATOR_RESYNC_INTERVAL_SECONDS": "30",
        }
        env.pop("IFW_OPERATOR_CONFIG_FILE", None)
        with open(log, "wb") as out:
            operator = subprocess.Popen([*args.wrap.split(), sys.executable, "-m", "ifw.operator"], env=env, stdout=out,
                                        stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            created: dict[str, float] = {}
            jobs_seen: dict[str, float] = {}
            all_seen = threading.Event()
            batch = client.BatchV1Api(config.new_client_from_config(config_file=cp.kubeconfig))
            listing = batch.list_namespaced_job(ns)
            ready = threading.Event()

            def watch_jobs() -> None:
                w = watch.Watch()
                ready.set()
                for event in w.stream(batch.list_namespaced_job, ns, resource_version=listing.metadata.resource_version,
                                      timeout_seconds=300, _preload_content=True):
                    if event["type"] == "ADDED":
                        uid = event["object"].metadata.labels["ifw.dev/job-uid"]
                        jobs_seen.setdefault(uid, time.monotonic())
                        if len(jobs_seen) >= args.jobs:
                            all_seen.set()
                            w.stop()

            watcher = threading.Thread(target=watch_jobs, daemon=True)
            watcher.start()
            ready.wait()
            # The operator is up once it has answered one job; that one is not counted.
            custom = client.CustomObjectsApi(api)
            body = lambda name: {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name},  # noqa: E731
                                 "spec": {"audio": {"url": "https://media.example.com/a.mp3"}}}
            warm = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body("warm-up"))
            deadline = time.monotonic() + 60
            while warm["metadata"]["uid"] not in jobs_seen:
                if time.monotonic() > deadline or operator.poll() is not None:
                    raise SystemExit(f"operator did not start; log {log}:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            args.jobs += 1  # the watcher counts the warm-up job too
            rss_before = rss_kib(operator.pid)
            pids = {"operator": operator.pid, **{name: pid for name, pid in zip(("etcd", "apiserver"), cp.pids)},
                    "bench": os.getpid()}
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}

            clients = [client.CustomObjectsApi(config.new_client_from_config(config_file=cp.kubeconfig))
                       for _ in range(args.threads)]
            t0 = time.monotonic()

            def create(i: int) -> None:
                if args.rate:
                    delay = t0 + i / args.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                obj = clients[i % args.threads].create_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, body(f"job-{i:04d}"))
                created[obj["metadata"]["uid"]] = time.monotonic()

            with ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(create, range(args.jobs - 1)))
            t_created = time.monotonic() - t0
            if not all_seen.wait(120):
                raise SystemExit(f"only {len(jobs_seen) - 1} of {args.jobs - 1} Jobs appeared in 120 s")
            t_all = max(jobs_seen[uid] for uid in created) - t0
            latencies = [(jobs_seen[uid] - created[uid]) * 1000 for uid in created]
            rss_after, rss_peak = rss_kib(operator.pid)
            import urllib.request

            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            series = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
                      if ln.startswith("ifw_operator_job_create_seconds_")}
            in_operator_ms = 1000 * series["ifw_operator_job_create_seconds_sum"] / series[
                "ifw_operator_job_create_seconds_count"]
            cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
            n = len(created)
            figures = {
                "jobs": n,
                "client_threads": args.threads,
                "rate_per_s": args.rate or None,
                "create_phase_s": round(t_created, 2),
                "create_rate_per_s": round(n / t_created, 1),
                "latency_ms_p50": round(statistics.median(latencies), 1),
                "latency_ms_p90": round(percentile(latencies, 90), 1),
                "latency_ms_p99": round(percentile(latencies, 99), 1),
                "latency_ms_max": round(max(latencies), 1),
                "all_jobs_created_s": round(t_all, 2),
                "operator_rss_mib_idle": round(rss_before[0] / 1024, 1),
                "operator_rss_mib_after": round(rss_after / 1024, 1),
                "operator_rss_mib_peak": round(rss_peak / 1024, 1),
                "operator_seen_to_job_ms_mean": round(in_operator_ms, 1),
                "cpu_seconds": cpu,
                "operator_cpu_ms_per_job": round(cpu["operator"] * 1000 / n, 2),
                "apiserver_cpu_ms_per_job": round(cpu["apiserver"] * 1000 / n, 2),
                "cpus": os.cpu_count(),
            }
            if audit_log:
                time.sleep(3)  # the writes that follow a Job's creation (its status) land too
                figures["operator_requests_per_job"] = operator_requests(audit_log, n + 1, ns)  # + the warm-up
            # Each target's ratio (figure / target: <= 1 meets it); the 30 s is for 500 jobs, scaled.
            for key, value, target in (("p50", figures["latency_ms_p50"], 100), ("p99", figures["latency_ms_p99"], 500),
                                       ("all", figures["all_jobs_created_s"], 30 * n / 500)):  # fmt: skip
                figures[f"ratio_{key}"] = round(value / target, 3)
        finally:
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()

    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>26}: {value}")
        ok = all(figures[f"ratio_{key}"] <= 1 for key in ("p50", "p99", "all"))
        print(f"{'targets (p50<=100ms, p99<=500ms, all<=30s per 500)':>26}: {'met' if ok else 'NOT met'}")
    return 0


def operator_requests(audit_log: Path, jobs: int, namespace: str) -> dict[str, float]:
    """The operator's requests to the apiserver in the namespace, per job, by verb and resource
    (told apart from the bench's own by User-Agent; watches count once, however long they stream)."""
    counts: dict[str, int] = {}
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        agent = entry.get("userAgent", "")
        if entry.get("stage") != "ResponseComplete" or ref.get("namespace") != namespace:
            continue
        if not (agent.startswith("kopf/") or agent.startswith("ifw-operator/")):
            continue
        key = f"{entry['verb']} {ref.get('resource', '')}" + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        counts[key] = counts.get(key, 0) + 1
    per_job = {key: round(count / jobs, 2) for key, count in sorted(counts.items())}
    per_job["total"] = round(sum(counts.values()) / jobs, 2)
    return per_job


if __name__ == "__main__":
    raise SystemExit(main())
