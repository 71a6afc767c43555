"""Kubernetes-style metadata, conditions and quantities shared by every resource."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

GROUP = "exo.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# Who wrote an object last: "token ID (role); user agent", stamped by the server on every write.
LAST_WRITER_ANNOTATION = f"{GROUP}/last-applied-by"

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class Frozen(BaseModel):
    """Base for every API struct: immutable, unknown fields rejected, camelCase on the wire."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def check_dns_subdomain(value: str) -> str:
    if len(value) > 253 or not DNS1123_SUBDOMAIN.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters"
        )
    return value


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if len(key) > 316 or not LABEL_KEY.match(key):
            raise ValueError(f"label key {key!r} is not a valid qualified name")
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            raise ValueError(f"label value {value!r} for key {key!r} is not valid (at most 63 characters: letters, digits, '-', '_', '.')")
    return labels


class ManagedFieldsEntry(Frozen):
    """Which fields one manager owns (server-side apply), in Kubernetes' FieldsV1 form."""
    manager: str
    operation: Literal["Apply", "Update"]
    apiVersion: str
    time: str
    fieldsType: Literal["FieldsV1"] = "FieldsV1"
    fieldsV1: dict = Field(default_factory=dict)
    subresource: str | None = None


class ObjectMeta(Frozen):
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Server-set fields: ignored when a user sends them in a manifest.
    uid: str | None = None
    resourceVersion: str | None = None
    generation: int | None = None
    creationTimestamp: str | None = None
    deletionTimestamp: str | None = None
    managedFields: list[ManagedFieldsEntry] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_dns_subdomain(value)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 63 or not DNS1123_LABEL.match(value)):
            raise ValueError(f"{value!r} is not a valid namespace (a DNS-1123 label)")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value)


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(Frozen):
    type: str
    status: ConditionStatus
    reason: str = ""
    message: str = ""
    lastTransitionTime: str | None = None
    observedGeneration: int | None = None


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMGTPE]i?|k)?$")
_UNITS = {
    None: 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5, "E": 1000**6,
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6,
}


def parse_quantity(value: str | int) -> int:
    """Bytes from a Kubernetes quantity such as ``16Gi``, ``512M`` or a plain integer."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} must not be negative")
        return value
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a quantity (examples: 16Gi, 512Mi, 8G, 1048576)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(value: int | float) -> str:
    """Human-readable binary size, e.g. ``15.8Gi``."""
    for unit, scale in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{int(value)}B"


Quantity = Annotated[str | int, Field(description="bytes, or a quantity such as 16Gi")]
