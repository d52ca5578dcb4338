"""Install the project's CRD into a test cluster and wait until it is served."""

from __future__ import annotations

import time

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ifw.crds.generate import load


def install_crd(api_client: client.ApiClient, timeout: float = 30.0) -> dict:
    """Create or replace the TranscriptionJob CRD; return it once Established."""
    manifest = load()
    name = manifest["metadata"]["name"]
    ext = client.ApiextensionsV1Api(api_client)
    try:
        ext.create_custom_resource_definition(manifest)
    except ApiException as error:
        if error.status != 409:
            raise
        current = ext.read_custom_resource_definition(name)
        manifest["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(name, manifest)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(name)
        if any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or [])):
            # Discovery of the new group can lag the condition by a moment.
            try:
                client.CustomObjectsApi(api_client).get_api_resources(manifest["spec"]["group"], "v1alpha1")
                return manifest
            except ApiException:
                pass
        time.sleep(0.1)
    raise TimeoutError(f"CRD {name} not Established within {timeout}s")
