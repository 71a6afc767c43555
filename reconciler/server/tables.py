"""``meta.k8s.io/v1`` Table responses (what ``kubectl get`` asks for), from the same printer
columns as ``exoctl get``: priority 0 columns show by default, priority 1 only with ``-o wide``."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from exo_ctl.api.columns import COLUMNS, Column

TABLE_GROUPS = ("meta.k8s.io",)
INCLUDE_OBJECT = ("None", "Object", "PartialObjectMetadata")


def _media_params(part: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in part.split(";")[1:])}


def wants_table(accept: str) -> bool:
    """Whether the first acceptable type of ``accept`` is a meta.k8s.io Table."""
    for part in accept.split(","):
        params = _media_params(part)
        if params.get("as") == "Table" and params.get("g") in TABLE_GROUPS and params.get("v") in ("v1", "v1beta1"):
            return True
        if part.split(";")[0].strip() in ("application/json", "*/*", "application/yaml") and not params:
            return False
    return False


def column_definitions(kind: str) -> list[dict[str, Any]]:
    return [{"name": _title(c), "type": "string", "format": "name" if c.header == "NAME" else "",
             "description": _description(c), "priority": 1 if c.wide_only else 0} for c in COLUMNS[kind]]


def _title(column: Column) -> str:
    return column.header.title()  # kubectl prints it upper-cased again


def _description(column: Column) -> str:
    return f"the {column.header.lower()} column of exoctl get"


def _partial(obj: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}


def table_row(obj: dict[str, Any], *, now: float, include: str) -> dict[str, Any]:
    row: dict[str, Any] = {"cells": [c.cell(obj, now) for c in COLUMNS[obj["kind"]]]}
    if include == "Object":
        row["object"] = obj
    elif include == "PartialObjectMetadata":
        row["object"] = _partial(obj)
    return row


def table(kind: str, objects: Sequence[dict[str, Any]], *, list_meta: dict[str, Any], include: str,
          headers: bool = True, now: float | None = None) -> dict[str, Any]:
    """A Table of ``objects`` (all of ``kind``); ``headers=False`` leaves the column definitions out
    (watch events after the first)."""
    assert kind in COLUMNS, kind
    now = time.time() if now is None else now
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta,
            "columnDefinitions": column_definitions(kind) if headers else [],
            "rows": [table_row(obj, now=now, include=include) for obj in objects]}
