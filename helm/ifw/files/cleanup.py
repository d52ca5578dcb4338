"""Helm pre-delete hook: make sure no TranscriptionJob blocks the uninstall.

The chart's own objects go away with the release; TranscriptionJobs and the CRD stay (Helm
never deletes CRDs from crds/). With the operator gone, a finalizer on a TranscriptionJob
would make its deletion (or the namespace's, or the CRD's) hang forever, so remove them all.
With IFW_CLEANUP_DELETE=true also delete every TranscriptionJob, which stops its runner pod
(the Job, its pods and Secrets are owned by it and garbage-collected).

IFW_CLEANUP_NAMESPACES: JSON list of namespaces; empty: every namespace.
Runs with the operator image (the kubernetes client); also runnable with $KUBECONFIG.
"""

import json
import os
import sys

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "ifw.dev", "v1alpha1", "transcriptionjobs"


def main() -> int:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.CustomObjectsApi()
    namespaces = json.loads(os.environ.get("IFW_CLEANUP_NAMESPACES") or "[]")
    delete = os.environ.get("IFW_CLEANUP_DELETE", "false").lower() == "true"

    jobs = []
    try:
        if namespaces:
            for ns in namespaces:
                jobs += api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        else:
            jobs = api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    except ApiException as error:
        if error.status == 404:  # CRD already gone: nothing can be stuck
            print("cleanup: no TranscriptionJob CRD served; nothing to do")
            return 0
        raise

    failures = 0
    for tj in jobs:
        meta = tj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            if meta.get("finalizers"):
                # A JSON merge patch replaces the list; null removes it.
                api.patch_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, name, {"metadata": {"finalizers": None}},
                    _content_type="application/merge-patch+json",
                )
                print(f"cleanup: removed finalizers {meta['finalizers']} from {ns}/{name}")
            if delete:
                api.delete_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, name, propagation_policy="Background"
                )
                print(f"cleanup: deleted {ns}/{name}")
        except ApiException as error:
            if error.status == 404:
                continue  # gone meanwhile
            failures += 1
            print(f"cleanup: {ns}/{name}: {error.status} {error.reason}", file=sys.stderr)
    print(f"cleanup: {len(jobs)} TranscriptionJob(s) seen, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
