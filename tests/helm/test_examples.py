"""The chart values shipped in examples/ render, and do what their comments say."""

from __future__ import annotations

from ifw.core.results import ResultSettings
from tests.helm.conftest import ROOT, one


def test_s3_results_example_gives_every_component_the_bucket(helm):
    objects = helm.template("-f", str(ROOT / "examples" / "s3-results" / "values.yaml"))
    for name in ("ifw-operator", "ifw-gateway"):
        (container,) = one(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        settings = ResultSettings(**{k.removeprefix("IFW_").lower(): v for k, v in env.items()
                                     if k.startswith(("IFW_RESULT_", "IFW_S3_"))})  # fmt: skip
        assert (settings.result_store, settings.s3_bucket, settings.s3_prefix) == ("s3", "transcripts", "ifw/"), name
        assert container["envFrom"] == [{"secretRef": {"name": "ifw-s3"}}], name
