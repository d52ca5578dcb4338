"""Turn the pydantic models into the CustomResourceDefinition.

pydantic's JSON schema is close to a Kubernetes structural schema; this module
inlines `$ref`s, folds `Optional[X]` (anyOf X|null) into X, drops pydantic-only
keys and adds the CEL rules that make the spec immutable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ifw.crds import transcriptionjob as tj

CRD_PATH = Path(__file__).with_name("transcriptionjob.yaml")

_DROP = {"title", "$defs"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[1]]
        node = {**target, **node}
    if node.get("x-kubernetes-int-or-string"):
        # int | "Auto": a structural schema allows no other branches here; the field's CEL rule bounds it.
        node.pop("anyOf", None)
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"unions other than Optional[X] cannot be expressed structurally: {variants}")
        variant = variants[0]
        if "$ref" in variant:
            variant = {**defs[variant["$ref"].rsplit("/", 1)[1]]}
        node = {**variant, **node}
    if node.get("default", 0) is None:
        del node["default"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("format") == "date-time":
        node["type"] = "string"
    if node.get("type") == "object" and "properties" in node:
        node.pop("additionalProperties", None)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value, defs)
        else:
            out[key] = value
    return out


def _immutability_rules(spec_schema: dict[str, Any]) -> list[dict[str, str]]:
    """One transition rule per immutable field, so the error names that field."""
    rules = []
    for name in spec_schema["properties"]:
        if name in tj.MUTABLE_SPEC_FIELDS:
            continue
        if name in spec_schema.get("required", []):
            rule = f"self.{name} == oldSelf.{name}"
        else:
            rule = f"has(self.{name}) == has(oldSelf.{name}) && (!has(self.{name}) || self.{name} == oldSelf.{name})"
        rules.append({"rule": rule, "message": f"spec.{name} is immutable", "fieldPath": f".{name}"})
    return rules


def model_schema(model: type[tj.BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def crd_manifest() -> dict[str, Any]:
    spec = model_schema(tj.TranscriptionJobSpec)
    spec["description"] = "What to transcribe and how. Immutable after creation except suspend and ttlSecondsAfterFinished."
    # The spec's own rules (fields that exclude each other), then one immutability rule per field.
    spec["x-kubernetes-validations"] = spec.get("x-kubernetes-validations", []) + _immutability_rules(spec)
    status = model_schema(tj.TranscriptionJobStatus)
    status["description"] = "What the operator and the runner observed. Written only through the status subresource."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{tj.PLURAL}.{tj.GROUP}"},
        "spec": {
            "group": tj.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": tj.KIND,
                "listKind": f"{tj.KIND}List",
                "plural": tj.PLURAL,
                "singular": tj.SINGULAR,
                "shortNames": tj.SHORT_NAMES,
                "categories": ["all", "ifw"],
            },
            "versions": [
                {
                    "name": tj.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": tj.PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A request to transcribe one audio file with Whisper, optionally split "
                            "by speaker. The operator runs it as a batch/v1 Job on a GPU node.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "ifw.dev/v1alpha1"},
                                "kind": {"type": "string", "description": "TranscriptionJob"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated from crds/transcriptionjob.py by `python -m ifw.crds`. Do not edit by hand.\n"


def render() -> str:
    return HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False, allow_unicode=True, width=120)


def load() -> dict[str, Any]:
    """The CRD as committed (what Helm and kubectl install)."""
    return yaml.safe_load(CRD_PATH.read_text())
