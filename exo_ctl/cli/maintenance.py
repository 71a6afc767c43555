"""``exoctl cordon|uncordon NODE`` and ``exoctl drain NODE [--timeout]``: node maintenance.

Cordon sets the Node's ``spec.unschedulable`` (a merge PATCH, admin role). The scheduler then
gives the node no shards and moves the ones it holds to other nodes make-before-break; drain
cordons and follows that move until no shard is left on the node and every deployment that had
one is Ready again, so the node can be stopped without interrupting a request.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from exo_ctl.api.resources import KINDS
from exo_ctl.cli import printers
from exo_ctl.cli.common import CliError, Context, call, parse_duration, server_error
from exo_ctl.client import HttpError, Client, ConnectionFailed

NODE, SHARD, DEPLOYMENT = KINDS["Node"], KINDS["Shard"], KINDS["ModelDeployment"]
DEFAULT_DRAIN_TIMEOUT = "5m"
POLL_SECONDS = 0.5
DATAPATH_PATH = "/internal/v1/datapath"  # the node's stage server: the shards it still holds
NODE_TIMEOUT_SECONDS = 5.0


def add_parsers(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    for verb, text in (("cordon", "mark a node unschedulable: it gets no new shards and its shards move away"),
                       ("uncordon", "mark a node schedulable again")):
        parser = subparsers.add_parser(verb, parents=parents, help=text, description=text[0].upper() + text[1:] + ".")
        parser.add_argument("node", metavar="NODE")
        parser.set_defaults(handler=run_cordon, unschedulable=verb == "cordon")
    parser = subparsers.add_parser(
        "drain", parents=parents, help="cordon a node and wait until its shards run elsewhere",
        description="Cordon NODE, then wait until the scheduler has moved every shard off it (make before "
                    "break) and the deployments they belong to are Ready; exits non-zero on timeout.")
    parser.add_argument("node", metavar="NODE")
    parser.add_argument("--timeout", default=DEFAULT_DRAIN_TIMEOUT,
                        help=f"give up after this long (e.g. 90s, 5m); default {DEFAULT_DRAIN_TIMEOUT}")
    parser.set_defaults(handler=run_drain)


def set_unschedulable(ctx: Context, node: str, unschedulable: bool) -> bool:
    """Patch the Node; whether it changed (False: it was already so)."""
    live = call(ctx, lambda: ctx.client.get(NODE, node), info=NODE, name=node)
    if bool((live.get("spec") or {}).get("unschedulable")) == unschedulable:
        return False
    call(ctx, lambda: ctx.client.patch(NODE, node, {"spec": {"unschedulable": unschedulable}}), info=NODE, name=node)
    return True


def run_cordon(args: argparse.Namespace, ctx: Context) -> int:
    changed = set_unschedulable(ctx, args.node, args.unschedulable)
    verb = "cordoned" if args.unschedulable else "uncordoned"
    ctx.out(f"{NODE.ref(args.node)} {verb if changed else 'already ' + verb}")
    return 0


def drain_state(shards: list[dict[str, Any]], deployments: list[dict[str, Any]], *, node: str,
                owners: set[str]) -> tuple[list[str], list[str]]:
    """(shards still on ``node``, deployments among ``owners`` not Ready), both sorted."""
    left = sorted(s["metadata"]["name"] for s in shards if (s.get("spec") or {}).get("nodeName") == node)
    ready = {f"{d['metadata'].get('namespace') or 'default'}/{d['metadata']['name']}" for d in deployments
             if printers.condition_status(d, "Ready") == "True"}
    return left, sorted(owners - ready)


def run_drain(args: argparse.Namespace, ctx: Context) -> int:
    timeout = parse_duration(args.timeout)
    deadline = ctx.monotonic() + timeout
    changed = set_unschedulable(ctx, args.node, True)
    ctx.out(f"{NODE.ref(args.node)} {'cordoned' if changed else 'already cordoned'}")
    owners: set[str] = set()
    reported: tuple[Any, ...] | None = None
    seen_events: set[str] = set()
    reported_held: dict[str, int] | None = None
    while True:
        shards = call(ctx, lambda: ctx.client.list(SHARD)).get("items") or []
        deployments = call(ctx, lambda: ctx.client.list(DEPLOYMENT, all_namespaces=True)).get("items") or []
        live = {f"{d['metadata'].get('namespace') or 'default'}/{d['metadata']['name']}" for d in deployments}
        owners |= {s["spec"]["deployment"] for s in shards if s["spec"].get("nodeName") == args.node}
        owners &= live  # a deployment deleted meanwhile has nothing left to wait for
        left, waiting = drain_state(shards, deployments, node=args.node, owners=owners)
        if (left, waiting) != reported:
            reported = (left, waiting)
            ctx.out(f"{len(left)} shard{'' if len(left) == 1 else 's'} on {args.node}"
                    + (f" ({', '.join(left)})" if left else "")
                    + (f"; waiting for Ready: {', '.join(waiting)}" if waiting else ""))
        for blocked in _blocked(ctx, deployments, owners=owners, seen=seen_events):
            ctx.err(f"warning: {blocked}")
        if not left and not waiting:
            held = still_serving(ctx, args.node)
            if not held:
                ctx.out(f"{NODE.ref(args.node)} drained")
                return 0
            if held != reported_held:
                reported_held = held
                ctx.out(f"{args.node} finishes requests in flight on its old shards: "
                        + ", ".join(f"{name} ({count})" for name, count in sorted(held.items())))
        if ctx.monotonic() >= deadline:
            raise CliError(f"timed out after {args.timeout} draining node {args.node}: {len(left)} shard(s) left"
                           + (f", not Ready: {', '.join(waiting)}" if waiting else "")
                           + (f", old shards still serving: {', '.join(sorted(reported_held))}" if reported_held else ""))
        time.sleep(POLL_SECONDS)


def still_serving(ctx: Context, node: str) -> dict[str, int]:
    """Shards the node's stage server still holds (a deleted one serves its streams in flight to
    the end), with their requests in flight; {} once all are unloaded or the node is unreachable."""
    live = call(ctx, lambda: ctx.client.get(NODE, node), info=NODE, name=node)
    spec = live.get("spec") or {}
    scheme = spec.get("apiScheme") or urlsplit(ctx.config.server).scheme or "http"
    direct = Client(replace(ctx.config, server=f"{scheme}://{spec.get('address')}:{spec.get('apiPort')}",
                            timeout=NODE_TIMEOUT_SECONDS))
    try:
        return dict(direct.request("GET", DATAPATH_PATH)[0].get("shards") or {})
    except ConnectionFailed:
        return {}  # stopped or unreachable: nothing left to wait for
    except HttpError as error:
        if error.code == 404:  # a node without a data path holds no shards
            return {}
        raise server_error(error) from None


def _blocked(ctx: Context, deployments: list[dict[str, Any]], *, owners: set[str], seen: set[str]) -> list[str]:
    """New DrainBlocked events of the deployments being moved: why their shards stay."""
    out = []
    for deployment in deployments:
        meta = deployment["metadata"]
        if f"{meta.get('namespace') or 'default'}/{meta['name']}" not in owners:
            continue
        for event in call(ctx, lambda: ctx.client.events_for(deployment)):
            key = f"{event['metadata']['name']}/{event.get('count')}"
            if event.get("reason") == "DrainBlocked" and key not in seen:
                seen.add(key)
                out.append(f"{meta['name']}: {event.get('message', '')}")
    return out
