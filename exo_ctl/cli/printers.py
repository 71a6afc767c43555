"""Rendering objects the kubectl way: tables with upper-case headers and AGE, -o yaml/json/name,
and ``List`` wrapping. Pure functions of (objects, now)."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import yaml

from exo_ctl.api.columns import (  # noqa: F401 — re-exported for the commands
    COLUMNS, NONE, Cell, Column, age, condition, condition_status, dig, node_memory, node_state, parse_timestamp,
    shard_layers, shard_progress, short_duration)
from exo_ctl.api.resources import KINDS, KindInfo
from exo_ctl.cli import jsonpath

OUTPUT_FORMATS = ("wide", "yaml", "json", "name")
JSONPATH = "jsonpath="
LAST_APPLIED = "exo.dev/last-applied-configuration"
KUBECTL_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def table_columns(info: KindInfo, *, wide: bool, all_namespaces: bool) -> list[Column]:
    columns = [c for c in COLUMNS[info.kind] if wide or not c.wide_only]
    if wide:  # NAME first when wide adds it (shards), as kubectl does.
        columns.sort(key=lambda c: c.header != "NAME")
    if all_namespaces and info.namespaced:
        columns.insert(0, Column("NAMESPACE", lambda o, n: o["metadata"].get("namespace", "")))
    return columns


def table_rows(objects: Sequence[dict[str, Any]], columns: Sequence[Column], now: float) -> list[list[str]]:
    return [[column.cell(obj, now) for column in columns] for obj in objects]


def column_widths(rows: Sequence[Sequence[str]]) -> list[int]:
    return [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []


def format_row(row: Sequence[str], widths: Sequence[int]) -> str:
    """Cells left-aligned and separated by at least two spaces, trailing space trimmed."""
    return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = column_widths([list(headers), *rows])
    return [format_row(row, widths) for row in [list(headers), *rows]]


# --- structured output -----------------------------------------------------------------------

def as_list(objects: Sequence[dict[str, Any]], resource_version: str = "") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": resource_version},
            "items": list(objects)}


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=True)


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=4, ensure_ascii=False)


def object_ref(obj: dict[str, Any]) -> str:
    return KINDS[obj["kind"]].ref(obj["metadata"]["name"]) if obj.get("kind") in KINDS else obj["metadata"]["name"]


def without_managed_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """What kubectl prints by default: the object without ``metadata.managedFields``."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or "managedFields" not in meta:
        return obj
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def render_objects(objects: Sequence[dict[str, Any]], output: str, *, single: bool,
                   show_managed_fields: bool = False) -> str:
    """``-o yaml|json|name|jsonpath=TEMPLATE`` text for objects; a ``List`` unless exactly one
    object was asked for."""
    if output == "name":
        return "\n".join(object_ref(o) for o in objects)
    if not show_managed_fields and not output.startswith(JSONPATH):  # kubectl's jsonpath keeps them too
        objects = [without_managed_fields(o) for o in objects]
    document: Any = objects[0] if single and len(objects) == 1 else as_list(objects)
    if output.startswith(JSONPATH):
        return jsonpath.render(output[len(JSONPATH):], document)
    return to_yaml(document).rstrip("\n") if output == "yaml" else to_json(document)


def output_format(value: str) -> str:
    """An ``-o`` value: one of OUTPUT_FORMATS, or ``jsonpath=TEMPLATE`` (checked here)."""
    if value.startswith(JSONPATH):
        return value  # the template is checked by the command (a bad one exits 1, as kubectl's does)
    if value not in OUTPUT_FORMATS:
        raise argparse.ArgumentTypeError(f"unable to match a printer for {value!r}: use one of "
                                         f"{', '.join(OUTPUT_FORMATS)} or jsonpath=TEMPLATE")
    return value
