"""`ifw result NAME`: print a finished TranscriptionJob's transcript (also `kubectl ifw result NAME`).

The transcript never lives in the TranscriptionJob: status.result points at a Secret (gzip JSON)
or an S3 object. This reads it where it is, checks its sha256 and renders it like the gateway
does (ifw.core.formats). S3 needs the same IFW_S3_* / AWS_* settings the operator has.

    ifw result standup                       # the original API's JSON output
    ifw result standup --format srt -n team-a
"""

from __future__ import annotations

import argparse
import os
import sys

from ifw.core import contract, formats, kube, results


def _current_namespace(kubeconfig: str | None) -> str:
    from kubernetes import config

    try:
        _, active = config.list_kube_config_contexts(config_file=kubeconfig or os.environ.get("KUBECONFIG"))
        return (active or {}).get("context", {}).get("namespace") or "default"
    except config.ConfigException:
        return "default"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ifw result", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the TranscriptionJob")
    parser.add_argument("-n", "--namespace", help="default: the kubeconfig context's namespace")
    parser.add_argument("--format", "-o", choices=formats.FORMATS, default="json")
    parser.add_argument("--kubeconfig", help="default: $KUBECONFIG, the pod's account, ~/.kube/config")
    args = parser.parse_args(argv)

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    namespace = args.namespace or _current_namespace(args.kubeconfig)
    with kube.api_client(kubeconfig=args.kubeconfig, component="cli") as api:
        try:
            tj = kube.TranscriptionJobs(api).get(namespace, args.name)
        except ApiException as error:
            print(f"ifw result: {namespace}/{args.name}: {kube.api_message(error)}", file=sys.stderr)
            return 1
        if tj is None:
            print(f"ifw result: {namespace}/{args.name}: TranscriptionJob not found", file=sys.stderr)
            return 1
        status = tj.get("status") or {}
        phase = contract.phase_of(tj) or contract.Phase.Pending
        if phase == contract.Phase.Failed:
            print(f"ifw result: {args.name} failed: {status.get('reason')}: {status.get('message')}", file=sys.stderr)
            return 2
        if phase != contract.Phase.Succeeded or not status.get("result"):
            progress = (status.get("progress") or {}).get("percent")
            done = f", {progress:g}% done" if progress is not None else ""
            print(f"ifw result: {args.name} is {phase}{done}; no result yet", file=sys.stderr)
            return 1
        try:
            transcript = results.load_result(status["result"], namespace, job_uid=tj["metadata"]["uid"],
                                             core_v1=client.CoreV1Api(api), settings=results.ResultSettings())
        except results.ResultStoreFailed as error:
            print(f"ifw result: {args.name}: {error.message}", file=sys.stderr)
            return 1
    body = formats.render(transcript, args.format)
    sys.stdout.write(body if body.endswith("\n") else body + "\n")
    return 0
