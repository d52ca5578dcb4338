"""Helm pre-delete hook: make sure no TranscriptionJob blocks the uninstall.

The chart's own objects go away with the release; TranscriptionJobs and the CRD stay (Helm
never deletes CRDs from crds/). With the operator gone, its finalizer (ifw.dev/cleanup,
ifw.core.contract.FINALIZER) on a TranscriptionJob would make its deletion (or the namespace's,
or the CRD's) hang forever, so remove it. Only ifw's own: another tool's finalizer on the same
job is that tool's promise, and stays.
With IFW_CLEANUP_DELETE=true also delete every TranscriptionJob, which stops its runner pod
(the Job, its pods and Secrets are owned by it and garbage-collected).

IFW_CLEANUP_NAMESPACES: JSON list of namespaces; empty: every namespace.
Runs with the operator image (the kubernetes client, ifw.core); also runnable with $KUBECONFIG.
"""

import json
import os
import sys

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ifw.core.contract import FINALIZER

GROUP, VERSION, PLURAL = "ifw.dev", "v1alpha1", "transcriptionjobs"
ATTEMPTS = 5  # another writer changing the finalizers between our read and our patch


def strip_finalizer(api: client.CustomObjectsApi, tj: dict) -> bool:
    """Remove FINALIZER from tj's finalizers, leaving every other entry; True if it was there.

    A JSON patch that first tests the entry at that index is still ours: a list changed
    meanwhile (422) is read again, never overwritten with a stale copy.
    """
    meta = tj["metadata"]
    ns, name = meta["namespace"], meta["name"]
    for _ in range(ATTEMPTS):
        finalizers = meta.get("finalizers") or []
        if FINALIZER not in finalizers:
            return False
        path = f"/metadata/finalizers/{finalizers.index(FINALIZER)}"
        try:
            api.patch_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, name,
                [{"op": "test", "path": path, "value": FINALIZER}, {"op": "remove", "path": path}],
                _content_type="application/json-patch+json",
            )
            return True
        except ApiException as error:
            if error.status != 422:
                raise
        meta = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)["metadata"]
    raise RuntimeError(f"{ns}/{name}: its finalizers kept changing; {FINALIZER} is still there")


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
        ns, name = tj["metadata"]["namespace"], tj["metadata"]["name"]
        try:
            if strip_finalizer(api, tj):
                print(f"cleanup: removed {FINALIZER} from {ns}/{name}")
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
        except RuntimeError as error:
            failures += 1
            print(f"cleanup: {error}", file=sys.stderr)
    print(f"cleanup: {len(jobs)} TranscriptionJob(s) seen, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
