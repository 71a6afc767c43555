"""The placement plan that a server dry run of a ModelDeployment answers (``X-Exo-Placement``),
as the table ``exoctl apply --dry-run=server`` prints under the object's line."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from exo_ctl.cli.printers import format_table

PLACEMENT_HEADER = "X-Exo-Placement"
GIB = 1024**3


def placement_from_headers(headers: Mapping[str, str]) -> dict[str, Any] | None:
    """The decoded plan, or None when the answer carries none (other kinds, older servers)."""
    raw = next((v for k, v in headers.items() if k.lower() == PLACEMENT_HEADER.lower()), None)
    if raw is None:
        return None
    try:
        plan = json.loads(raw)
    except ValueError:
        return None
    return plan if isinstance(plan, dict) else None


def render_placement(plan: Mapping[str, Any]) -> list[str]:
    """REPLICA, STAGE, NODE, LAYERS, MEMORY (weights) rows, with KV CACHE and OVERHEAD (activations,
    runtime) where the plan reserves them, then ``<problem>: <reason>`` (e.g.
    ``Unschedulable: needs 131.4 GiB of weights + ...``) when something does not fit."""
    assignments = plan.get("assignments") or []
    reserved = any(a.get("kvCacheBytes") or a.get("overheadBytes") for a in assignments)
    rows = [[str(a["replica"]), f"{a['index'] + 1}/{a['stages']}", a["node"],
             f"{a['layers']['start']}-{a['layers']['end'] - 1}", _gib(a["memoryBytes"]),
             *((_gib(a.get("kvCacheBytes", 0)), _gib(a.get("overheadBytes", 0))) if reserved else ())]
            for a in assignments]
    header = ["REPLICA", "STAGE", "NODE", "LAYERS", "MEMORY", *(("KV CACHE", "OVERHEAD") if reserved else ())]
    lines = format_table(header, rows) if rows else []
    if plan.get("reason"):
        lines.append(f"{plan.get('problem') or 'Unschedulable'}: {plan['reason']}")
    return lines


def _gib(size: int) -> str:
    """GiB, or MiB / KiB for the small reservations of small models."""
    if size >= GIB // 10 or size == 0:
        return f"{size / GIB:.1f} GiB"
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"
