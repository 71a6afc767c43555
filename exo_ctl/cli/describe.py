"""``exoctl describe TYPE NAME``: kubectl-style ``Key:  value`` sections for people."""
from __future__ import annotations

import argparse
import re
from typing import Any

from exo_ctl.api.meta import LAST_WRITER_ANNOTATION, format_bytes
from exo_ctl.cli import printers
from exo_ctl.cli.common import Context, call, object_namespace, resolve_targets

INDENT = "  "


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("describe", parents=parents, help="show an object in detail",
                                   description="Show details of objects: metadata, spec, status and conditions.")
    parser.add_argument("resources", nargs="+", metavar="TYPE NAME... | TYPE/NAME...")
    parser.add_argument("-l", "--selector", help="describe every object with these labels")
    parser.set_defaults(handler=run)


def title(key: str) -> str:
    """``memoryHeadroom`` → ``Memory Headroom`` (kubectl's rendering of custom resource fields)."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", key)
    return spaced[:1].upper() + spaced[1:]


def _scalar(value: Any) -> str:
    if value is None or value == "":
        return printers.NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_value(key: str, value: Any, depth: int) -> list[str]:
    pad = INDENT * depth
    if isinstance(value, dict):
        if not value:
            return [f"{pad}{title(key)}:  {printers.NONE}"]
        lines = [f"{pad}{title(key)}:"]
        for child_key, child in value.items():
            lines += render_value(child_key, child, depth + 1)
        return lines
    if isinstance(value, list):
        if not value:
            return [f"{pad}{title(key)}:  {printers.NONE}"]
        lines = [f"{pad}{title(key)}:"]
        for item in value:
            if isinstance(item, dict):
                entries = [line for k, v in item.items() for line in render_value(k, v, depth + 2)]
                lines.append(f"{pad}{INDENT}- " + entries[0].lstrip() if entries else f"{pad}{INDENT}- {{}}")
                lines += entries[1:]
            else:
                lines.append(f"{pad}{INDENT}- {_scalar(item)}")
        return lines
    if key == "memory" and isinstance(value, int) and not isinstance(value, bool):
        return [f"{pad}{title(key)}:  {format_bytes(value)} ({value} bytes)"]
    return [f"{pad}{title(key)}:  {_scalar(value)}"]


def _mapping_lines(label: str, mapping: dict[str, str], width: int) -> list[str]:
    if not mapping:
        return [f"{label + ':':<{width}}{printers.NONE}"]
    items = [f"{k}={v}" for k, v in sorted(mapping.items())]
    return [f"{label + ':':<{width}}{items[0]}"] + [" " * width + item for item in items[1:]]


def _table(rows: list[list[str]], depth: int = 1) -> list[str]:
    return [INDENT * depth + line for line in printers.format_table(rows[0], rows[1:])]


def event_lines(events: list[dict[str, Any]], *, now: float) -> list[str]:
    """kubectl's Events table: AGE is when last seen, with ``(xN over AGE)`` for repeats."""
    if not events:
        return [f"Events:  {printers.NONE}"]
    rows = [["Type", "Reason", "Age", "From", "Message"], ["----", "------", "----", "----", "-------"]]
    for event in events:
        last = printers.short_duration(now - (printers.parse_timestamp(event.get("lastTimestamp")) or now))
        if int(event.get("count") or 1) > 1:
            first = printers.short_duration(now - (printers.parse_timestamp(event.get("firstTimestamp")) or now))
            last += f" (x{event['count']} over {first})"
        rows.append([_scalar(event.get("type")), _scalar(event.get("reason")), last,
                     _scalar((event.get("source") or {}).get("component")), _scalar(event.get("message"))])
    return ["Events:", *_table(rows)]


def cached_model_lines(models: list[dict[str, Any]], *, now: float) -> list[str]:
    """A node's Cached Models table: source, revision, bytes on disk, whether it holds every file
    (``complete``) or which parts, and how long ago a Shard last loaded from it."""
    if not models:
        return [f"Cached Models:  {printers.NONE}"]
    rows = [["SOURCE", "REVISION", "SIZE", "HOLDS", "LAST USED"]]
    for model in sorted(models, key=lambda m: (str(m.get("source")), str(m.get("revision")))):
        holds = "complete" if model.get("complete") else ", ".join(model.get("parts") or []) or printers.NONE
        used = printers.parse_timestamp(model.get("lastUsed"))
        rows.append([_scalar(model.get("source") or model.get("name")), _scalar(model.get("revision")),
                     format_bytes(int(model.get("bytes") or 0)), holds,
                     printers.NONE if used is None else printers.short_duration(now - used) + " ago"])
    total = sum(int(m.get("bytes") or 0) for m in models)
    return [f"Cached Models:  {len(models)}, {format_bytes(total)} on disk", *_table(rows)]


def describe(obj: dict[str, Any], *, now: float, events: list[dict[str, Any]] | None = None) -> str:
    """The whole description of one object, with its recent events (None: not fetched)."""
    meta = obj.get("metadata") or {}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if k not in (printers.LAST_APPLIED, LAST_WRITER_ANNOTATION)}
    width = 14
    lines = [f"{'Name:':<{width}}{meta.get('name')}"]
    if meta.get("namespace"):
        lines.append(f"{'Namespace:':<{width}}{meta['namespace']}")
    lines += _mapping_lines("Labels", meta.get("labels") or {}, width)
    lines += _mapping_lines("Annotations", annotations, width)
    writer = (meta.get("annotations") or {}).get(LAST_WRITER_ANNOTATION)
    if writer:
        lines.append(f"{'Last Writer:':<{width}}{writer}")
    lines += [f"{'API Version:':<{width}}{obj.get('apiVersion')}", f"{'Kind:':<{width}}{obj.get('kind')}"]
    lines.append("Metadata:")
    for key in ("creationTimestamp", "deletionTimestamp", "generation", "resourceVersion", "uid"):
        if meta.get(key) is not None:
            lines.append(f"{INDENT}{title(key) + ':':<20}{meta[key]}")
    if meta.get("creationTimestamp"):
        lines.append(f"{INDENT}{'Age:':<20}{printers.age(obj, now)}")
    if obj.get("spec") is not None:
        lines += render_value("spec", obj["spec"], 0)
    status = dict(obj.get("status") or {})
    conditions = status.pop("conditions", None) or []
    shards = status.pop("shards", None) if obj.get("kind") == "ModelDeployment" else None
    cached = status.pop("cachedModels", None) if obj.get("kind") == "Node" else None
    if status:
        lines += render_value("status", status, 0)
    if cached is not None:
        lines += cached_model_lines(cached, now=now)
    if shards:
        lines.append("Shards:")
        rows = [["REPLICA", "INDEX", "NODE", "LAYERS", "PHASE"]]
        rows += [[_scalar(s.get(k)) for k in ("replica", "index", "node", "layers", "phase")] for s in shards]
        lines += _table(rows)
    lines.append("Conditions:" if conditions else f"Conditions:  {printers.NONE}")
    if conditions:
        rows = [["Type", "Status", "Reason", "Message", "LastTransitionTime"]]
        rows += [[_scalar(c.get(k)) for k in ("type", "status", "reason", "message", "lastTransitionTime")]
                 for c in conditions]
        lines += _table(rows)
    if events is not None:
        lines += event_lines(events, now=now)
    return "\n".join(lines)


def run(args: argparse.Namespace, ctx: Context) -> int:
    targets = resolve_targets(args.resources)
    objects = []
    for info, name in targets:
        namespace = object_namespace(info, ctx)
        if name is None:
            listing = call(ctx, lambda: ctx.client.list(info, namespace=namespace, label_selector=args.selector))
            objects += list(listing.get("items") or [])
        else:
            objects.append(call(ctx, lambda: ctx.client.get(info, name, namespace=namespace), info=info, name=name))
    if not objects:
        ctx.err(f"No resources found in {ctx.namespace} namespace." if targets[0][0].namespaced else "No resources found")
        return 0
    ctx.out("\n\n".join(describe(obj, now=ctx.clock(), events=call(ctx, lambda o=obj: ctx.client.events_for(o)))
                          for obj in objects))
    return 0
