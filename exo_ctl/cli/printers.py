"""Rendering objects the kubectl way: tables with upper-case headers and AGE, -o yaml/json/name,
and ``List`` wrapping. Pure functions of (objects, now)."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yaml

from exo_ctl.api.meta import format_bytes
from exo_ctl.api.resources import KINDS, KindInfo

NONE = "<none>"
OUTPUT_FORMATS = ("wide", "yaml", "json", "name")
LAST_APPLIED = "exo.dev/last-applied-configuration"


# --- time ------------------------------------------------------------------------------------

def parse_timestamp(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def short_duration(seconds: float) -> str:
    """kubectl's short human duration: ``5s``, ``3m``, ``2h``, ``4d``, ``1y``."""
    if seconds < -1:
        return "<invalid>"
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    if seconds < 365 * 86400:
        return f"{seconds // 86400}d"
    return f"{seconds // (365 * 86400)}y"


def age(obj: dict[str, Any], now: float) -> str:
    created = parse_timestamp(obj.get("metadata", {}).get("creationTimestamp"))
    return "<unknown>" if created is None else short_duration(now - created)


# --- fields ----------------------------------------------------------------------------------

def dig(obj: Any, *path: str | int, default: Any = None) -> Any:
    for part in path:
        if isinstance(obj, dict) and isinstance(part, str):
            obj = obj.get(part)
        elif isinstance(obj, list) and isinstance(part, int) and -len(obj) <= part < len(obj):
            obj = obj[part]
        else:
            return default
        if obj is None:
            return default
    return obj


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for item in dig(obj, "status", "conditions", default=[]) or []:
        if isinstance(item, dict) and str(item.get("type", "")).lower() == kind.lower():
            return item
    return None


def condition_status(obj: dict[str, Any], kind: str) -> str:
    found = condition(obj, kind)
    return str(found.get("status", "Unknown")) if found else "Unknown"


def node_state(obj: dict[str, Any]) -> str:
    return {"True": "Ready", "False": "NotReady"}.get(condition_status(obj, "Ready"), "Unknown")


def node_memory(obj: dict[str, Any]) -> str:
    total = dig(obj, "status", "capacity", "memory", default=0)
    free = dig(obj, "status", "allocatable", "memory", default=0)
    if not total:
        return NONE
    return f"{format_bytes(free)}/{format_bytes(total)}"


def shard_progress(obj: dict[str, Any]) -> str:
    phase = dig(obj, "status", "phase", default="Pending")
    progress = float(dig(obj, "status", "progress", default=0.0) or 0.0)
    if phase == "Ready":
        progress = max(progress, 1.0)
    percent = progress * 100 if progress <= 1.0 else progress
    return f"{int(percent)}%"


def shard_layers(obj: dict[str, Any]) -> str:
    start, end = dig(obj, "spec", "layers", "start"), dig(obj, "spec", "layers", "end")
    if start is None or end is None:
        return NONE
    total = dig(obj, "spec", "totalLayers")
    return f"{start}-{end - 1}" + (f"/{total}" if total else "")


# --- columns ---------------------------------------------------------------------------------

Cell = Callable[[dict[str, Any], float], str]


@dataclass(frozen=True)
class Column:
    header: str
    cell: Cell
    wide_only: bool = False


def _field(*path: str | int, default: str = NONE) -> Cell:
    def cell(obj: dict[str, Any], now: float) -> str:
        value = dig(obj, *path)
        return default if value is None or value == "" else str(value)
    return cell


def _name(obj: dict[str, Any], now: float) -> str:
    return obj["metadata"]["name"]


def _age(obj: dict[str, Any], now: float) -> str:
    return age(obj, now)


COLUMNS: dict[str, tuple[Column, ...]] = {
    "ModelDeployment": (
        Column("NAME", _name),
        Column("MODEL", _field("spec", "model", "source")),
        Column("REPLICAS", lambda o, n: f"{dig(o, 'status', 'readyReplicas', default=0)}/{dig(o, 'spec', 'replicas', default=1)}"),
        Column("READY", lambda o, n: condition_status(o, "Ready")),
        Column("AGE", _age),
        Column("STRATEGY", _field("spec", "placement", "strategy", default="Pack"), wide_only=True),
        Column("GENERATION", _field("metadata", "generation"), wide_only=True),
        Column("ENDPOINT", _field("status", "endpoint"), wide_only=True),
    ),
    "Node": (
        Column("NAME", _name),
        Column("STATUS", lambda o, n: node_state(o)),
        Column("ROLE", _field("status", "role")),
        Column("MEMORY", lambda o, n: node_memory(o)),
        Column("ADDRESS", _field("spec", "address")),
        Column("AGE", _age),
        Column("VERSION", _field("status", "version")),
        Column("API-PORT", _field("spec", "apiPort"), wide_only=True),
        Column("CHIP", _field("status", "capacity", "chip"), wide_only=True),
        Column("NODE-ID", _field("spec", "nodeId"), wide_only=True),
    ),
    "Shard": (
        Column("NAME", _name, wide_only=True),
        Column("DEPLOYMENT", _field("spec", "deployment")),
        Column("REPLICA", _field("spec", "replica")),
        Column("INDEX", _field("spec", "index")),
        Column("LAYERS", lambda o, n: shard_layers(o)),
        Column("NODE", _field("spec", "nodeName")),
        Column("PHASE", _field("status", "phase", default="Pending")),
        Column("PROGRESS", lambda o, n: shard_progress(o)),
        Column("AGE", _age),
        Column("MESSAGE", _field("status", "message", default=""), wide_only=True),
    ),
}


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


def render_objects(objects: Sequence[dict[str, Any]], output: str, *, single: bool) -> str:
    """``-o yaml|json|name`` text for objects; a ``List`` unless exactly one object was asked for."""
    if output == "name":
        return "\n".join(object_ref(o) for o in objects)
    document: Any = objects[0] if single and len(objects) == 1 else as_list(objects)
    return to_yaml(document).rstrip("\n") if output == "yaml" else to_json(document)
