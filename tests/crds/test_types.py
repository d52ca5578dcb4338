"""The CRD YAML is generated from the pydantic types; these tests keep them in step."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from ifw.core.languages import WHISPER_LANGUAGES, normalize_language
from ifw.crds import generate
from ifw.crds import transcriptionjob as tj


def test_committed_crd_equals_the_one_generated_from_the_types():
    committed = generate.CRD_PATH.read_text()
    assert committed == generate.render(), (
        "crds/transcriptionjob.yaml is stale: run `python -m ifw.crds` and commit the result"
    )


def test_drift_check_notices_a_change_on_either_side(monkeypatch, tmp_path):
    """A changed model (or a hand edit of the YAML) must make the comparison above fail."""
    baseline = generate.render()
    hand_edited = tmp_path / "transcriptionjob.yaml"
    hand_edited.write_text(baseline.replace("default: 64", "default: 65"))
    monkeypatch.setattr(generate, "CRD_PATH", hand_edited)
    with pytest.raises(AssertionError, match="stale"):
        test_committed_crd_equals_the_one_generated_from_the_types()
    monkeypatch.undo()

    field = tj.TranscriptionJobSpec.model_fields["batch_size"]
    monkeypatch.setattr(field, "default", 32)
    tj.TranscriptionJobSpec.model_rebuild(force=True)
    try:
        assert generate.render() != baseline
    finally:
        monkeypatch.undo()
        tj.TranscriptionJobSpec.model_rebuild(force=True)
    assert generate.render() == baseline


def _spec_schema() -> dict:
    return generate.load()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_every_field_is_documented_and_structural():
    crd = generate.load()
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        if path in ("", ".metadata") or (path.endswith("[]") and node.get("type") != "object"):
            continue
        assert node.get("description"), f"{path} has no description (kubectl explain would be empty)"
        # (an int-or-string field has no type: Kubernetes' own exception, as for IntOrString)
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type (not a structural schema)"
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title"} & node.keys(), f"{path} is not structural"


def test_every_spec_field_except_the_mutable_ones_has_an_immutability_rule():
    spec = _spec_schema()
    guarded = {rule["fieldPath"].lstrip(".") for rule in spec["x-kubernetes-validations"]}
    assert guarded == set(spec["properties"]) - tj.MUTABLE_SPEC_FIELDS
    assert tj.MUTABLE_SPEC_FIELDS <= set(spec["properties"])


def test_crd_metadata_matches_the_contract():
    crd = generate.load()
    names = crd["spec"]["names"]
    assert (crd["spec"]["group"], names["kind"], names["plural"], names["singular"]) == (
        "ifw.dev", "TranscriptionJob", "transcriptionjobs", "transcriptionjob",
    )
    assert names["shortNames"] == ["tj"] and names["categories"] == ["all", "ifw"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c.get("priority", 0) for c in version["additionalPrinterColumns"]}
    assert columns == {"Phase": 0, "Progress": 0, "Shards": 0, "Language": 0, "Duration": 0, "Age": 0,
                       "Reason": 1, "Model": 1, "Runtime": 1, "Worker": 1, "Job": 1}


def test_crd_manifest_is_a_valid_apiextensions_object():
    import kubernetes_validate

    kubernetes_validate.validate(generate.load(), "1.35.0", strict=True)


def test_defaults_match_the_types():
    spec = _spec_schema()["properties"]
    parsed = tj.TranscriptionJobSpec.model_validate({"audio": {"url": "https://example.com/a.mp3"}})
    assert parsed.task == spec["task"]["default"] == "transcribe"
    assert parsed.batch_size == spec["batchSize"]["default"] == 64  # the REST API's, the original's
    assert parsed.timestamp == spec["timestamp"]["default"] == "chunk"
    assert parsed.diarization.enabled is spec["diarization"]["properties"]["enabled"]["default"] is False
    assert parsed.backoff_limit == spec["backoffLimit"]["default"]
    assert parsed.suspend is False


def test_whisper_language_list_matches_the_tokenizer():
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    assert WHISPER_LANGUAGES == LANGUAGES


@pytest.mark.parametrize(("given", "code"), [("en", "en"), ("English", "en"), ("None", None), ("", None),
                                             (None, None), (" FR ", "fr"), ("cantonese", "yue")])
def test_normalize_language(given, code):
    assert normalize_language(given) == code


def test_normalize_language_refuses_unknown():
    with pytest.raises(ValueError, match="unsupported language 'klingon'"):
        normalize_language("klingon")


def test_yaml_round_trips():
    assert yaml.safe_load(generate.render()) == generate.crd_manifest()


def test_python_types_refuse_unknown_fields():
    with pytest.raises(ValidationError, match="batch_sise|batchSise"):
        tj.TranscriptionJobSpec.model_validate({"audio": {"url": "https://x.io/a"}, "batchSise": 3})
