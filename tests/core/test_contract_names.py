"""Names that cross process boundaries are typed once, in ifw.core.contract.

The strongest form of that claim: add a made-up failure reason to ``Reason`` alone, and the runner
(its exit code and termination message), the operator (retry or not, in a Job and in the pool,
pool or own Job) and the gateway (HTTP status) all honour it, with nothing else touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

from ifw.core import contract
from ifw.crds import transcriptionjob as crd

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter whose ifw.core.contract is the edited copy: every component then
# imports that one, exactly as if the line had been added to the file.
PROBE = r'''
import importlib.util, json, sys
from datetime import datetime, timezone

spec = importlib.util.spec_from_file_location("ifw.core.contract", sys.argv[1])
contract = importlib.util.module_from_spec(spec)
sys.modules["ifw.core.contract"] = contract
spec.loader.exec_module(contract)
import ifw.core
ifw.core.contract = contract

from ifw.runner import errors, execute
from ifw.operator import jobs, pool, status
from ifw.gateway.errors import TaskFailed

Reason = contract.Reason
out = {}
now = datetime(2026, 1, 1, tzinfo=timezone.utc)

for name in ("MadeUpBadInput", "MadeUpTransient"):
    failure = execute.as_failure(errors.RunnerError("it broke", Reason[name]))
    errors.write_termination_message(failure, path=__import__("pathlib").Path(sys.argv[2]))
    message = open(sys.argv[2]).read()
    # Job mode: the Job controller fails the job at once on the exit codes its podFailurePolicy names.
    fail_fast = any(rule["action"] == "FailJob" and failure.exit_code in rule["onExitCodes"]["values"]
                    for rule in jobs.POD_FAILURE_POLICY["rules"] if "onExitCodes" in rule)
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Failed", "containerStatuses": [{"name": "runner",
           "state": {"terminated": {"exitCode": failure.exit_code, "message": message}}}]}}
    job = {"status": {"conditions": [{"type": "Failed", "status": "True",
           "reason": "PodFailurePolicy" if fail_fast else "BackoffLimitExceeded"}]}}
    # Pool mode: the worker reports the failure; the operator retries it or gives up.
    report = {"worker": "w", "attempt": 1, "state": "Failed", "reason": failure.reason,
              "message": failure.message, "badInput": failure.bad_input}
    tj = {"spec": {"backoffLimit": 2}, "status": {"assignment": {"worker": "w", "attempt": 1}, "execution": report}}
    decision = pool.derive(tj, {}, now=now)
    out[name] = {"exit_code": failure.exit_code, "job_fails_fast": fail_fast,
                 "job_reason": status.failure_cause(job, [pod])[0],
                 "pool": [decision.outcome.phase, decision.outcome.reason, decision.action, decision.retry],
                 "http": TaskFailed("t", failure.reason, failure.message).status_code}

back = {"worker": "w", "attempt": 1, "state": "HandedBack", "reason": "MadeUpNotForPool", "message": "no"}
for runtime in ("Auto", "Pool"):
    tj = {"spec": {"runtime": runtime}, "status": {"assignment": {"worker": "w", "attempt": 1}, "execution": back}}
    out["hand-back " + runtime] = pool.derive(tj, {}, now=now).action
print(json.dumps(out))
'''

MADE_UP = '''\
    MadeUpBadInput = "MadeUpBadInput", _Meaning(bad_input=True, http_status=415)
    MadeUpTransient = "MadeUpTransient"
    MadeUpNotForPool = "MadeUpNotForPool", _Meaning(needs_own_job=True)
'''


def test_a_reason_added_in_one_place_is_honoured_by_runner_operator_and_gateway(tmp_path):
    source = (ROOT / "core" / "contract.py").read_text()
    anchor = '    RunnerFailed = "RunnerFailed"\n'
    assert anchor in source, "the Reason enum moved: update the anchor"
    edited = tmp_path / "contract.py"
    edited.write_text(source.replace(anchor, anchor + MADE_UP))
    probe = subprocess.run([sys.executable, "-c", PROBE, str(edited), str(tmp_path / "termination-log")],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)

    assert seen["MadeUpBadInput"] == {
        "exit_code": contract.EXIT_BAD_INPUT, "job_fails_fast": True, "job_reason": "MadeUpBadInput",
        "pool": ["Failed", "MadeUpBadInput", "unassign", False], "http": 415,
    }  # fmt: skip
    assert seen["MadeUpTransient"] == {
        "exit_code": contract.EXIT_TRANSIENT, "job_fails_fast": False, "job_reason": "MadeUpTransient",
        "pool": ["Pending", "Retrying", "assign", True], "http": 500,
    }  # fmt: skip
    # A hand-back that needs its own Job sends an Auto job there; a job pinned to the pool stays.
    assert seen["hand-back Auto"] == "to_job" and seen["hand-back Pool"] == "assign"


def test_the_enums_say_what_the_crd_says():
    """The CRD's schema is generated from its Literals; the enums every component compares with
    must name the same values."""
    assert tuple(contract.Phase) == typing.get_args(crd.Phase)
    assert tuple(contract.Runtime) == typing.get_args(crd.Runtime)
    assert tuple(contract.ExecutionState) == typing.get_args(crd.ExecutionState)


def test_every_bad_input_reason_is_a_4xx_and_every_other_a_500():
    for reason in contract.Reason:
        status = contract.http_status_for_reason(reason)
        assert (400 <= status < 500) == reason.bad_input, reason
    assert contract.http_status_for_reason("NotAReason") == 500 and contract.http_status_for_reason(None) == 500


def test_a_retryable_cause_behind_a_bad_input_reason_is_retried():
    from ifw.runner import errors

    assert errors.AudioFetchFailed("404").exit_code == contract.EXIT_BAD_INPUT
    unavailable = errors.AudioFetchUnavailable("503")
    assert unavailable.reason == "AudioFetchFailed" and unavailable.exit_code == contract.EXIT_TRANSIENT


def test_times_are_written_in_the_apis_two_formats():
    from datetime import datetime, timezone

    moment = datetime(2026, 12, 7, 18, 5, 9, 123456, tzinfo=timezone.utc)
    assert contract.format_time(moment) == "2026-12-07T18:05:09Z"
    assert contract.format_time(moment, micro=True) == "2026-12-07T18:05:09.123456Z"
    assert contract.parse_time(contract.format_time(moment, micro=True)) == moment
