"""A real Prometheus scraping the local stack has data for the dashboard's panels.

The local stack (operator, gateway and one pool worker on tiny.en, as `ifw local` runs them) and
Debian's `prometheus` binary on loopback, with a temporary storage dir, scraping the operator's,
the gateway's and the worker's /metrics every second. One job goes through the gateway's REST API
(sync, with a webhook to a loopback receiver); then every panel's query is asked through
Prometheus's HTTP API. Panels whose metrics exist after one successful pool job must return data;
those that legitimately stay empty (below) must still be valid queries (status success).
"""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from ifw.local.control_plane import ControlPlane, die_with_parent
from ifw.local.stack import LocalStack, _free_port
from tests.cluster.origin import Origin
from tests.helm.test_dashboard import panel_queries
from tests.speaking import speak
from tests.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.model]

# Panels (title, refId) that one successful job on CPU leaves empty, and why.
MAY_BE_EMPTY = {
    ("Failures by reason", "A"): "no job failed (the counter has a series per reason once one fails)",
    ("GPU memory peak", "A"): "set only where CUDA is in use; the test runs on CPU",
    ("Errors (5xx ratio)", "A"): "no 5xx: the status=~5.. series does not exist, so the ratio is empty",
    ("Job create latency", "A"): "Job mode only: a pool job creates no runner Job",
    ("Job create latency", "B"): "Job mode only: a pool job creates no runner Job",
}


def _query(prom: str, expr: str) -> dict:
    answer = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    assert answer.status_code == 200, f"{expr}: {answer.text}"
    body = answer.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]


def test_a_real_prometheus_scraping_the_local_stack_returns_data_for_every_panel(tmp_path):
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: apt-get install prometheus (.ci/setup installs it)"
    speech = speak("Please call me tomorrow morning.", tmp_path / "speech.wav").read_bytes()
    work = tmp_path / "stack"
    work.mkdir()
    with Origin(audio=speech) as origin, ControlPlane() as cp:
        stack = LocalStack(work, "tiny.en", webhook_allowlist=["127.0.0.1"])
        prometheus = None
        try:
            stack.start(cp)
            operator_port = yaml.safe_load((work / "operator.yaml").read_text())["metrics_port"]
            targets = {
                "operator": [f"127.0.0.1:{operator_port}"],
                "gateway": [stack.gateway_url.removeprefix("http://")],
                "pool-worker": [f"127.0.0.1:{port}" for port in stack.worker_health_ports],
            }
            config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                      "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]}
                                         for job, hosts in targets.items()]}  # fmt: skip
            (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
            port = _free_port()
            prom = f"http://127.0.0.1:{port}"
            log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
            prometheus = subprocess.Popen(
                [
                    binary,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # a killed pytest leaves no Prometheus behind
            )

            def all_up() -> bool:
                try:
                    found = _query(prom, "up == 1")["result"]
                except (httpx.HTTPError, AssertionError):
                    return False
                return len(found) == sum(len(hosts) for hosts in targets.values())

            wait_for(all_up, 60, "prometheus scraping the operator, the gateway and the worker", interval=0.5)
            time.sleep(2)  # a scrape or two before the job: the counters' increase is seen

            http = httpx.Client(base_url=stack.gateway_url, timeout=300)
            answer = http.post(
                "/", json={"url": f"{origin.base}/speech.wav", "webhook": {"url": f"{origin.base}/hook"}}
            )
            assert answer.status_code == 200, answer.text
            # The webhook is delivered after the job finished: wait for the operator to count it.
            wait_for(lambda: _query(prom, "sum(ifw_operator_webhook_deliveries_total)")["result"], 60,
                     "the webhook delivery counted and scraped", interval=0.5)  # fmt: skip
            time.sleep(3)  # a few more scrapes: rates over the job's increase

            empty = []
            for title, ref, expr in panel_queries():
                data = _query(prom, expr)  # valid, or the assertion names it
                if not data["result"] and (title, ref) not in MAY_BE_EMPTY:
                    empty.append(f"{title}/{ref}: {expr}")
            assert not empty, "panels without data after one job:\n" + "\n".join(empty)
            # What only this job can have produced, by value.
            audio = _query(prom, 'sum(ifw_operator_audio_seconds_total{model="tiny.en", runtime="Pool"})')["result"]
            assert audio and float(audio[0]["value"][1]) > 0.5
            wait = _query(prom, "sum(ifw_operator_pool_assignment_wait_seconds_count)")["result"]
            assert wait and float(wait[0]["value"][1]) >= 1
        finally:
            if prometheus is not None:
                prometheus.terminate()
                try:
                    prometheus.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    prometheus.kill()
                log.close()
            stack.stop()


def test_the_may_be_empty_list_names_real_panels():
    known = {(title, ref) for title, ref, _ in panel_queries()}
    assert set(MAY_BE_EMPTY) <= known, set(MAY_BE_EMPTY) - known
