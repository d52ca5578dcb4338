"""Gateway benchmark: many sync requests held on one shared watch, and async submissions.

Against the real test kube-apiserver (ifw.local.control_plane.ControlPlane), with the
gateway as its own process (``python -m ifw.gateway``, as deployed). The benchmark plays
the operator and runner: it stores each job's result Secret (ifw.core.results) and then
patches the job's status to Succeeded.

1. N concurrent sync ``POST /`` requests (default 10,000), each on its own connection and read
   with a real HTTP/1.1 parser (h11: Content-Length and chunked keep-alive answers alike);
   wait until the gateway reports N waiters (its ``ifw_gateway_sync_waiters`` gauge) and read
   its RSS;
2. complete the jobs at ``--rate`` per second (0 = as fast as the driver can);
   latency = the client received its response - the apiserver acknowledged the
   Succeeded status patch (p50/p99; also from before the patch was sent, an upper bound);
   every answer must be 200 with the text of the stored transcript (tests/gateway/conftest.py's
   ``transcript()``, imported, never retyped), else the run exits 1 naming the bad answers;
3. ``--async-jobs`` async submissions (with a webhook) at ``--concurrency``: requests/s.

    .venv/bin/python -m bench.gateway [--waiters 10000] [--rate 200] [--async-jobs 500]
    .venv/bin/python -m bench.gateway --quick     # 50 waiters, 1 s keep-alive: seconds (CI)

Targets: 10,000 waiters in <= 600 MB RSS, completion -> response p99 <= 200 ms; printed
with their ratios (figure / target: <= 1 meets it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_RSS_MB = 600  # with 10,000 waiters
TARGET_P99_MS = 200
MAX_RETRIES = 20  # per sync request answered 503 + Retry-After
sys.path.insert(0, str(REPO))

from bench.procstats import cpu_seconds, free_port, percentile, rss_kib  # noqa: E402


def install_crd(api) -> None:
    import yaml
    from kubernetes import client

    from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION

    ext = client.ApiextensionsV1Api(api)
    body = yaml.safe_load((REPO / "crds" / "transcriptionjob.yaml").read_text())
    try:
        ext.create_custom_resource_definition(body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    custom = client.CustomObjectsApi(api)
    for _ in range(300):
        try:
            custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, limit=1)
            return
        except client.ApiException:
            time.sleep(0.1)
    raise RuntimeError("CRD not served")


class GatewayProcess:
    def __init__(self, kubeconfig: str, namespace: str, timeout: float, keepalive: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "KUBECONFIG": kubeconfig,
            "IFW_GATEWAY_NAMESPACE": namespace,
            "IFW_GATEWAY_PORT": str(self.port),
            "IFW_GATEWAY_HOST": "127.0.0.1",
            "IFW_GATEWAY_LOG_LEVEL": "warning",
            "IFW_GATEWAY_SYNC_TIMEOUT_SECONDS": str(timeout),
            "IFW_GATEWAY_KEEPALIVE_SECONDS": str(keepalive),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ifw.gateway"], env=env, cwd=REPO, start_new_session=True
        )

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("gateway not ready")

    def waiters(self) -> float:
        """The gateway's count of held sync requests; 0 while it is too busy to answer /metrics
        (thousands of requests arriving at once on a loaded machine)."""
        import httpx

        try:
            text = httpx.get(f"{self.url}/metrics", timeout=10).text
        except httpx.TimeoutException:
            return 0.0
        for line in text.splitlines():
            if line.startswith("ifw_gateway_sync_waiters "):
                return float(line.split()[1])
        return 0.0

    def histogram(self, name: str) -> dict[str, float]:
        """A histogram's cumulative buckets (le -> count) from /metrics."""
        import httpx

        out = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(f"{name}_bucket{{"):
                le = line.split('le="')[1].split('"')[0]
                out[le] = float(line.split()[-1])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


async def post_json(host: str, port: int, body: bytes) -> tuple[int, bytes, bool, float | None]:
    """One POST / on its own connection, read with h11 (httpx's HTTP/1.1 parser): Content-Length
    or chunked answers alike (a sync answer not ready after KEEPALIVE_SECONDS is chunked, with
    spaces first). Plain asyncio rather than a pooling client: with thousands of connections
    open, a pool's bookkeeping would dominate the latency being measured. Also returns the
    answer's Retry-After in seconds (None without one)."""
    import h11

    reader, writer = await asyncio.open_connection(host, port)
    conn = h11.Connection(h11.CLIENT)
    try:
        headers = [("Host", f"{host}:{port}"), ("Content-Type", "application/json"),
                   ("Content-Length", str(len(body))), ("Connection", "close")]  # fmt: skip
        writer.write(conn.send(h11.Request(method="POST", target="/", headers=headers))
                     + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))  # fmt: skip
        await writer.drain()
        status, payload, chunked, retry_after = 0, bytearray(), False, None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.lower(): v.lower() for k, v in event.headers}
                chunked = headers.get(b"transfer-encoding") == b"chunked"
                if headers.get(b"retry-after", b"").isdigit():
                    retry_after = float(headers[b"retry-after"])
            elif isinstance(event, h11.Data):
                payload += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, bytes(payload), chunked, retry_after
    finally:
        writer.close()


def expected_text() -> str:
    """The text the driver's stored transcript renders to: the test fixture's, never retyped."""
    from tests.gateway.conftest import transcript

    return transcript().text


async def sync_clients(
    url: str, names: list[str], received: dict[str, float], statuses: dict[str, int], problems: dict[str, str]
) -> None:
    """Every sync request at once; each answer is checked, and one bad answer never drops the others.

    A burst this size is more than the apiserver of a 2-core machine creates within the gateway's
    kube deadline, so the gateway sheds some with 503 + Retry-After; each client then does what the
    OpenAI SDK and other client libraries do: waits that long (with jitter) and sends it again.
    The retries are counted in statuses["(retried)"]."""
    host, port = url.removeprefix("http://").split(":")
    text = expected_text()

    async def one(name: str) -> None:
        body = json.dumps({"url": "https://audio.example.com/bench.mp3", "managed_task_id": name}).encode()
        for attempt in range(MAX_RETRIES + 1):
            try:
                status, payload, chunked, retry_after = await post_json(host, int(port), body)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the others go on
                statuses[name], problems[name] = -1, f"{type(exc).__name__}: {exc}"
                return
            if status != 503 or retry_after is None or attempt == MAX_RETRIES:
                break
            statuses["(retried)"] = statuses.get("(retried)", 0) + 1
            await asyncio.sleep(retry_after * random.uniform(1.0, 2.0))
        received[name] = time.monotonic()
        statuses[name] = status
        if chunked:
            statuses["(chunked)"] = statuses.get("(chunked)", 0) + 1
        try:
            answer = json.loads(payload)  # leading keep-alive spaces are JSON whitespace
        except ValueError:
            problems[name] = f"HTTP {status}: not JSON: {payload[:200]!r}"
            return
        if status != 200 or answer.get("status") != "completed":
            problems[name] = f"HTTP {status}: {str(answer)[:200]}"
        elif answer["output"]["text"] != text:
            problems[name] = f"wrong text {answer['output']['text']!r}"

    await asyncio.gather(*(one(n) for n in names))


async def async_submissions(url: str, count: int, concurrency: int, headers: bool) -> tuple[float, dict[int, int]]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    codes: dict[int, int] = {}
    webhook: dict = {"url": "https://hooks.example.com/bench"}
    if headers:
        webhook["header"] = {"Authorization": "Bearer bench"}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                body = {"url": "https://audio.example.com/bench.mp3", "is_async": True, "webhook": webhook}
                response = await client.post("/", json=body)
                codes[response.status_code] = codes.get(response.status_code, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.monotonic() - started), codes


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gateway")
    ap.add_argument("--waiters", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=200.0, help="completions per second (0: as fast as possible)")
    ap.add_argument("--driver-threads", type=int, default=8)
    ap.add_argument("--async-jobs", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--keepalive-seconds", type=float, default=30.0,
                    help="the gateway's KEEPALIVE_SECONDS (its default, 30): slower answers come chunked, spaces first")
    ap.add_argument("--quick", action="store_true",
                    help="a CI-sized run: 50 waiters, 1 s keep-alive (every answer chunked), 20 async jobs")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if args.quick:
        args.waiters, args.rate, args.async_jobs, args.concurrency, args.keepalive_seconds = 50, 0.0, 20, 8, 1.0
    # One connection per waiter, here and in the gateway (which inherits the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.waiters + 1024
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        print(f"open-files limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} < {wanted}: lower --waiters", file=sys.stderr)
        return 2

    from kubernetes import client, config

    from ifw.core import results
    from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION
    from ifw.local.control_plane import ControlPlane
    from tests.gateway.conftest import transcript

    figures: dict = {"waiters": args.waiters, "rate": args.rate, "keepalive_seconds": args.keepalive_seconds}
    problems: dict[str, str] = {}
    with ControlPlane() as cp:
        api = config.new_client_from_config(config_file=cp.kubeconfig)
        api.configuration.connection_pool_maxsize = args.driver_threads * 2
        install_crd(api)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        namespace = f"bench-{uuid.uuid4().hex[:6]}"
        core.create_namespace({"metadata": {"name": namespace}})
        gateway = GatewayProcess(cp.kubeconfig, namespace, timeout=1800, keepalive=args.keepalive_seconds)
        try:
            gateway.wait_ready()
            figures["rss_idle_mib"] = round(rss_kib(gateway.proc.pid)[0] / 1024, 1)

            # 1. N sync requests, held by the gateway.
            names = [f"w-{i:05d}" for i in range(args.waiters)]
            received: dict[str, float] = {}
            statuses: dict[str, int] = {}
            loop_thread = threading.Thread(
                target=lambda: asyncio.run(sync_clients(gateway.url, names, received, statuses, problems)), daemon=True
            )
            t0 = time.monotonic()
            loop_thread.start()
            while gateway.waiters() < args.waiters:
                if time.monotonic() - t0 > 600:
                    raise RuntimeError(f"only {gateway.waiters()} waiters after 600 s")
                if problems:
                    raise RuntimeError(f"{len(problems)} requests failed before waiting: {next(iter(problems.values()))}")
                time.sleep(0.25)
            figures["all_waiting_after_s"] = round(time.monotonic() - t0, 2)
            time.sleep(1)
            rss, peak = rss_kib(gateway.proc.pid)
            figures["rss_with_waiters_mib"] = round(rss / 1024, 1)
            print(f"{args.waiters} waiters after {figures['all_waiting_after_s']} s "
                  f"({statuses.get('(retried)', 0)} retries after 503); gateway RSS {rss / 1024:.1f} MiB")

            # Results first, as in the real flow: the runner stores the result and reports it in
            # status.result, then the operator marks the job Succeeded once the runner's Job completed.
            jobs = {j["metadata"]["name"]: j for j in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]}
            settings = results.ResultSettings(result_store="secret")
            refs: dict[str, dict] = {}

            def store(name: str) -> None:
                # The operator's part (the empty result Secret), then the runner's: store the result,
                # report it on /status; the job still runs.
                core.create_namespaced_secret(namespace, results.result_secret(jobs[name]))
                refs[name] = results.store_result(transcript(), jobs[name], settings, core_v1=core)
                runner = {"result": refs[name], "progress": {"percent": 100.0}}
                custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": runner})

            with ThreadPoolExecutor(args.driver_threads) as pool:
                list(pool.map(store, names))

            # 2. Complete them, paced; record when the apiserver acknowledged each.
            sent: dict[str, float] = {}
            acked: dict[str, float] = {}

            def complete(i_name: tuple[int, str]) -> None:
                i, name = i_name
                if args.rate > 0:
                    delay = start + i / args.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                sent[name] = time.monotonic()
                status = {"phase": "Succeeded"}  # the operator's part, once the runner's Job completed
                custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})
                acked[name] = time.monotonic()

            cpu_before = cpu_seconds(gateway.proc.pid)
            start = time.monotonic()
            with ThreadPoolExecutor(args.driver_threads) as pool:
                list(pool.map(complete, enumerate(names)))
            loop_thread.join(300)
            if loop_thread.is_alive():
                problems["(clients)"] = f"{args.waiters - len(received)} requests still unanswered 300 s after completion"
            figures["completion_phase_s"] = round(time.monotonic() - start, 2)
            figures["gateway_cpu_ms_per_completion"] = round(
                (cpu_seconds(gateway.proc.pid) - cpu_before) * 1000 / args.waiters, 2
            )
            figures["answers_chunked_with_keepalive"] = statuses.pop("(chunked)", 0)
            figures["sync_retries_after_503"] = statuses.pop("(retried)", 0)
            ok = sum(1 for s in statuses.values() if s == 200)
            lat = [(received[n] - acked[n]) * 1000 for n in names if n in received and n in acked] or [float("nan")]
            lat_sent = [(received[n] - sent[n]) * 1000 for n in names if n in received and n in sent] or [float("nan")]
            buckets = gateway.histogram("ifw_gateway_completion_to_response_seconds")
            total = buckets.get("+Inf", 0) or 1
            figures["in_gateway_share_le_10ms"] = round(buckets.get("0.01", 0) / total, 3)
            figures["in_gateway_share_le_50ms"] = round(buckets.get("0.05", 0) / total, 3)
            figures["in_gateway_share_le_200ms"] = round(buckets.get("0.2", 0) / total, 3)
            figures.update(
                responses_200=ok,
                latency_ms_p50=round(statistics.median(lat), 1),
                latency_ms_p99=round(percentile(lat, 99), 1),
                latency_ms_max=round(max(lat), 1),
                latency_from_send_ms_p50=round(statistics.median(lat_sent), 1),
                latency_from_send_ms_p99=round(percentile(lat_sent, 99), 1),
                rss_peak_mib=round(rss_kib(gateway.proc.pid)[1] / 1024, 1),
            )
            print(
                f"completion -> response: p50 {figures['latency_ms_p50']} ms, p99 {figures['latency_ms_p99']} ms, "
                f"max {figures['latency_ms_max']} ms (from patch sent: p50 {figures['latency_from_send_ms_p50']}, "
                f"p99 {figures['latency_from_send_ms_p99']}); {ok}/{args.waiters} answered 200; "
                f"gateway CPU {figures['gateway_cpu_ms_per_completion']} ms per completion; inside the gateway "
                f"(watch event -> result rendered): {figures['in_gateway_share_le_10ms']:.1%} <= 10 ms, "
                f"{figures['in_gateway_share_le_50ms']:.1%} <= 50 ms, {figures['in_gateway_share_le_200ms']:.1%} <= 200 ms"
            )
            # The targets, and each figure's ratio to its target (<= 1 meets it).
            # RSS: measured at 10,000 waiters, else extrapolated there from idle and this run's cost per waiter.
            idle_mb, with_mb = figures["rss_idle_mib"] * 2**20 / 1e6, figures["rss_with_waiters_mib"] * 2**20 / 1e6
            rss_mb = idle_mb + (with_mb - idle_mb) * 10_000 / args.waiters
            figures["rss_kb_per_waiter"] = round((with_mb - idle_mb) * 1000 / args.waiters, 1)
            at = "with 10000 waiters" if args.waiters == 10_000 else f"at 10000 waiters (extrapolated from {args.waiters})"
            for key, label, value, target, unit in (
                ("rss", f"gateway RSS {at}", rss_mb, TARGET_RSS_MB, "MB"),
                ("p99", "completion -> answer p99", figures["latency_ms_p99"], TARGET_P99_MS, "ms"),
            ):
                figures[f"target_{key}"] = round(target, 1)
                figures[f"ratio_{key}"] = round(value / target, 3)
                verdict = "meets" if value <= target else "MISSES"
                print(f"target {label}: {value:.1f} {unit} / {target:g} {unit} = {value / target:.2f} ({verdict} it)")

            # 3. Async submissions.
            if args.async_jobs:
                for headers in (False, True):
                    cpu_before = cpu_seconds(gateway.proc.pid)
                    rps, codes = asyncio.run(async_submissions(gateway.url, args.async_jobs, args.concurrency, headers))
                    cpu_ms = (cpu_seconds(gateway.proc.pid) - cpu_before) * 1000 / args.async_jobs
                    key = "async_with_header_secret_rps" if headers else "async_rps"
                    figures[key] = round(rps, 1)
                    figures[key + "_codes"] = codes
                    figures[key.replace("_rps", "_gateway_cpu_ms")] = round(cpu_ms, 2)
                    if set(codes) != {200}:
                        problems[key] = f"async submissions answered {codes}"
                    print(
                        f"async submissions{' (+ headers Secret)' if headers else ''}: {rps:.1f}/s {codes}; "
                        f"gateway CPU {cpu_ms:.2f} ms each"
                    )
            figures["rss_end_mib"] = round(rss_kib(gateway.proc.pid)[0] / 1024, 1)
        finally:
            gateway.stop()
    figures["bad_answers"] = len(problems)
    print(json.dumps(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if problems:
        print(f"{len(problems)} bad answers, e.g.:", file=sys.stderr)
        for name, problem in list(problems.items())[:5]:
            print(f"  {name}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
