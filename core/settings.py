"""Settings classes that name their own environment variables.

A component that sets another's settings (the operator building a runner Job, the local stack
starting processes) asks the settings class for the env name instead of spelling it: a renamed
or misspelt field then fails at once, not silently as an ignored variable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from pydantic import AliasChoices
from pydantic_settings import BaseSettings


@dataclass(frozen=True)
class ValueFrom:
    """An env value the kubelet fills in (a Kubernetes ``valueFrom`` source)."""

    source: dict[str, Any]


def field_ref(path: str) -> ValueFrom:
    """The downward API: a field of the pod itself, e.g. ``metadata.name``, ``spec.nodeName``."""
    return ValueFrom({"fieldRef": {"fieldPath": path}})


def env_value(value: Any) -> str:
    """A value as pydantic-settings parses it back: lists and dicts as JSON, bools as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float | PurePath):
        return str(value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    raise TypeError(f"no env form for {value!r}")


class EnvNamed(BaseSettings):
    """Base of the settings classes: ``env_var`` names a field's variable, ``env``/``k8s_env`` set fields."""

    @classmethod
    def env_var(cls, field: str) -> str:
        """The variable pydantic-settings reads for ``field`` (an alias's first choice, if it has one)."""
        try:
            info = cls.model_fields[field]
        except KeyError:
            raise KeyError(f"{cls.__name__} has no setting {field!r}") from None
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            alias = alias.choices[0]
        if isinstance(alias, str):
            return alias
        if alias is not None:
            raise TypeError(f"{cls.__name__}.{field}: no env name for alias {alias!r}")
        name = f"{cls.model_config.get('env_prefix', '')}{field}"
        return name if cls.model_config.get("case_sensitive") else name.upper()

    @classmethod
    def env(cls, **values: Any) -> dict[str, str]:
        """Env that sets these fields (by field name) to these values."""
        return {cls.env_var(field): env_value(value) for field, value in values.items()}

    @classmethod
    def k8s_env(cls, **values: Any) -> list[dict[str, Any]]:
        """The same as a container's env list, in the order given; a ``ValueFrom`` becomes ``valueFrom``."""
        return [
            {"name": cls.env_var(field), "valueFrom": value.source}
            if isinstance(value, ValueFrom)
            else {"name": cls.env_var(field), "value": env_value(value)}
            for field, value in values.items()
        ]
