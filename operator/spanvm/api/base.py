"""Shared pieces of the API models: the camelCase model base, rule helpers, Condition.

Every field carries a description: the CRD generator copies it into the OpenAPI schema so
`kubectl explain` can show it, and refuses to generate a schema for a field without one.
"""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

QUANTITY_PATTERN = r"^([+]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


class ApiModel(BaseModel):
    """Base of every API shape: camelCase on the wire, snake_case in Python, no unknown keys."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(
    rule: str, message: str, field_path: str | None = None, reason: str | None = None
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry (a CEL rule checked by the API server)."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules for a model or a field."""
    return {"x-kubernetes-validations": list(rules)}


def immutable(field: str) -> dict[str, str]:
    """A CEL transition rule: the field cannot change once the object exists."""
    return cel(
        "self == oldSelf",
        f"{field} is immutable: delete and recreate the SpanningVM to change it",
    )


class Condition(ApiModel):
    """A status condition in the standard Kubernetes shape."""

    type: str = Field(description="Condition type, e.g. Scheduled, FabricReady, Ready.")
    status: Literal["True", "False", "Unknown"] = Field(
        description="Whether the condition holds: True, False or Unknown."
    )
    reason: str | None = Field(
        default=None, description="One CamelCase word a program can match on."
    )
    message: str | None = Field(
        default=None, description="What a person needs to know: why, and what to do."
    )
    last_transition_time: datetime | None = Field(
        default=None, description="When the status last changed."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this condition was computed for."
    )


CONDITIONS_LIST_EXTRA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


class ObjectMeta(ApiModel):
    """The part of metadata the models read; the API server owns the rest."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="Object name.")
    namespace: str | None = Field(default=None, description="Object namespace.")
    labels: dict[str, str] | None = Field(default=None, description="Labels.")
    annotations: dict[str, str] | None = Field(default=None, description="Annotations.")
