"""The printer columns of every kind, shared by ``exoctl get`` and the API's Table responses
(what ``kubectl get`` prints). Pure functions of (object, now)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from exo_ctl.api.meta import format_bytes

NONE = "<none>"


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
    state = {"True": "Ready", "False": "NotReady"}.get(condition_status(obj, "Ready"), "Unknown")
    return state + ",SchedulingDisabled" if dig(obj, "spec", "unschedulable", default=False) else state


def node_memory(obj: dict[str, Any]) -> str:
    total = dig(obj, "status", "capacity", "memory", default=0)
    free = dig(obj, "status", "allocatable", "memory", default=0)
    if not total:
        return NONE
    return f"{format_bytes(free)}/{format_bytes(total)}"


def format_rate(bytes_per_s: float) -> str:
    """A transfer rate in the binary units of the byte columns: ``12.5MiB/s``."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.1f}{unit}/s"
    return f"{int(bytes_per_s)}B/s"


def shard_progress(obj: dict[str, Any]) -> str:
    """``40%`` of the weights loaded; while Downloading, ``42% 12.5MiB/s`` of the bytes fetched."""
    phase = dig(obj, "status", "phase", default="Pending")
    if phase == "Downloading":
        done = int(dig(obj, "status", "bytesDownloaded", default=0) or 0)
        total = int(dig(obj, "status", "bytesToDownload", default=0) or 0)
        rate = float(dig(obj, "status", "downloadRate", default=0.0) or 0.0)
        percent = f"{min(100, done * 100 // total)}%" if total else "0%"
        return f"{percent} {format_rate(rate)}" if rate > 0 else percent
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


def _seen(field: str) -> Cell:
    def cell(obj: dict[str, Any], now: float) -> str:
        moment = parse_timestamp(obj.get(field))
        return "<unknown>" if moment is None else short_duration(now - moment)
    return cell


def _involved(obj: dict[str, Any], now: float) -> str:
    ref = obj.get("involvedObject") or {}
    return f"{str(ref.get('kind', '')).lower()}/{ref.get('name', '')}"


COLUMNS["Event"] = (
    Column("LAST SEEN", _seen("lastTimestamp")),
    Column("TYPE", _field("type")),
    Column("REASON", _field("reason")),
    Column("OBJECT", _involved),
    Column("MESSAGE", _field("message", default="")),
    Column("SOURCE", _field("source", "component"), wide_only=True),
    Column("FIRST SEEN", _seen("firstTimestamp"), wide_only=True),
    Column("COUNT", _field("count"), wide_only=True),
    Column("NAME", _name, wide_only=True),
)
