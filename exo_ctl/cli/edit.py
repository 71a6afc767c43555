"""``exoctl label|annotate TYPE NAME KEY=VALUE... KEY-... [--overwrite]``, ``patch TYPE NAME -p PATCH
[--type merge|strategic|json]`` and ``scale TYPE/NAME --replicas N``, as kubectl has them."""
from __future__ import annotations

import argparse
import json
from typing import Any

from exo_ctl.api.meta import LABEL_KEY
from exo_ctl.cli.common import CliError, Context, UsageError, call, object_namespace, resolve_targets
from exo_ctl.client import PATCH_CONTENT_TYPES


def add_parsers(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    for verb, field in (("label", "labels"), ("annotate", "annotations")):
        parser = subparsers.add_parser(verb, parents=parents, help=f"update the {field} of an object")
        parser.add_argument("resource", metavar="TYPE NAME | TYPE/NAME", nargs="+")
        parser.add_argument("--overwrite", action="store_true", help="replace values that are already set")
        parser.set_defaults(handler=run_metadata, field=field, verb=verb)
    patch = subparsers.add_parser("patch", parents=parents, help="update fields of an object with a patch")
    patch.add_argument("resource", metavar="TYPE NAME | TYPE/NAME", nargs="+")
    patch.add_argument("-p", "--patch", required=True, help="the patch, as JSON")
    patch.add_argument("--type", choices=tuple(PATCH_CONTENT_TYPES), default="strategic",
                       help="merge, strategic (the same as merge for exo.dev kinds) or json")
    patch.set_defaults(handler=run_patch)
    scale = subparsers.add_parser("scale", parents=parents, help="set the replicas of a ModelDeployment")
    scale.add_argument("resource", metavar="TYPE NAME | TYPE/NAME", nargs="+")
    scale.add_argument("--replicas", type=int, required=True)
    scale.set_defaults(handler=run_scale)


def _split(words: list[str], *, pairs: bool) -> tuple[list[str], list[str]]:
    """The object words (TYPE NAME or TYPE/NAME) and what follows them."""
    count = 1 if "/" in words[0] else 2
    if len(words) < count:
        raise UsageError("name the object: TYPE NAME or TYPE/NAME")
    rest = words[count:]
    if not pairs and rest:
        raise UsageError(f"unexpected arguments: {' '.join(rest)}")
    return words[:count], rest


def _target(ctx: Context, words: list[str]):
    ((info, name),) = resolve_targets(words)
    if name is None:
        raise UsageError("name the object: TYPE NAME or TYPE/NAME")
    return info, name, object_namespace(info, ctx)


def metadata_patch(current: dict[str, str], changes: list[str], *, what: str, overwrite: bool) -> dict[str, Any]:
    """``k=v`` sets, ``k-`` removes; refuses to change a set value without ``overwrite``."""
    if not changes:
        raise UsageError(f"at least one {what[:-1]} update is required: KEY=VALUE or KEY-")
    patch: dict[str, Any] = {}
    for change in changes:
        if change.endswith("-") and "=" not in change:
            patch[change[:-1]] = None
            continue
        key, found, value = change.partition("=")
        if not found or not LABEL_KEY.match(key):
            raise UsageError(f"invalid {what[:-1]} {change!r}: expected KEY=VALUE or KEY-")
        if key in current and current[key] != value and not overwrite:
            raise CliError(f"'{key}' already has a value ({current[key]}), and --overwrite is false")
        patch[key] = value
    return patch


def run_metadata(args: argparse.Namespace, ctx: Context) -> int:
    words, changes = _split(args.resource, pairs=True)
    info, name, namespace = _target(ctx, words)
    live = call(ctx, lambda: ctx.client.get(info, name, namespace=namespace), info=info, name=name)
    current = (live.get("metadata") or {}).get(args.field) or {}
    patch = metadata_patch(current, changes, what=args.field, overwrite=args.overwrite)
    body = {"metadata": {args.field: patch, "resourceVersion": live["metadata"]["resourceVersion"]}}
    call(ctx, lambda: ctx.client.patch(info, name, body, namespace=namespace), info=info, name=name)
    ctx.out(f"{info.ref(name)} {'labeled' if args.verb == 'label' else 'annotated'}")
    return 0


def run_patch(args: argparse.Namespace, ctx: Context) -> int:
    words, _ = _split(args.resource, pairs=False)
    info, name, namespace = _target(ctx, words)
    try:
        patch = json.loads(args.patch)
    except ValueError as error:
        raise UsageError(f"--patch: invalid JSON: {error}") from None
    before = call(ctx, lambda: ctx.client.get(info, name, namespace=namespace), info=info, name=name)
    after = call(ctx, lambda: ctx.client.patch(info, name, patch, namespace=namespace, patch_type=args.type),
                 info=info, name=name)
    changed = after["metadata"]["resourceVersion"] != before["metadata"]["resourceVersion"]
    ctx.out(f"{info.ref(name)} {'patched' if changed else 'patched (no change)'}")
    return 0


def run_scale(args: argparse.Namespace, ctx: Context) -> int:
    words, _ = _split(args.resource, pairs=False)
    info, name, namespace = _target(ctx, words)
    if info.kind != "ModelDeployment":
        raise UsageError(f"{info.plural} cannot be scaled; only modeldeployments have replicas")
    if args.replicas < 0:
        raise UsageError(f"--replicas: must be 0 or more, got {args.replicas}")
    call(ctx, lambda: ctx.client.patch(info, name, {"spec": {"replicas": args.replicas}}, namespace=namespace,
                                       patch_type="merge", subresource="scale"), info=info, name=name)
    ctx.out(f"{info.ref(name)} scaled")
    return 0
