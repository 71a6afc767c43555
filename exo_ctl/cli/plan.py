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
    """REPLICA, STAGE, NODE, LAYERS, MEMORY rows, then ``<problem>: <reason>`` (e.g.
    ``Unschedulable: needs 131.4 GiB, ...``) when something does not fit."""
    assignments = plan.get("assignments") or []
    rows = [[str(a["replica"]), f"{a['index'] + 1}/{a['stages']}", a["node"],
             f"{a['layers']['start']}-{a['layers']['end'] - 1}", f"{a['memoryBytes'] / GIB:.1f} GiB"]
            for a in assignments]
    lines = format_table(["REPLICA", "STAGE", "NODE", "LAYERS", "MEMORY"], rows) if rows else []
    if plan.get("reason"):
        lines.append(f"{plan.get('problem') or 'Unschedulable'}: {plan['reason']}")
    return lines
