"""``exoctl token create --role R [--ttl 30d] [--description TEXT]``, ``token list [-o json]``,
``token revoke ID``: role tokens (admin, edit, view, inference), minted by an admin.

``create`` prints the token alone on stdout (``TOKEN=$(exoctl token create --role view)``); the
cluster keeps only its hash, so it cannot be shown again.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from exo_ctl.cli.common import CliError, Context, UsageError, parse_duration, server_error
from exo_ctl.client import HttpError, Client

TOKENS_PATH = "/admin/v1/tokens"
ROLES = ("admin", "edit", "view", "inference")


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("token", parents=parents, help="create, list and revoke role tokens",
                                   description="Role tokens for the API: admin, edit, view, inference.")
    verbs = parser.add_subparsers(dest="token_command", metavar="VERB", parser_class=type(parser))
    create = verbs.add_parser("create", parents=parents, help="mint a token; prints it alone on stdout")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--ttl", help="expire after this long, e.g. 30d, 12h (default: never)")
    create.add_argument("--description", default="", help="what the token is for")
    create.set_defaults(handler=run_create)
    listing = verbs.add_parser("list", parents=parents, help="list tokens (never their values)")
    listing.add_argument("-o", "--output", choices=("json",), help="print JSON instead of a table")
    listing.set_defaults(handler=run_list)
    revoke = verbs.add_parser("revoke", parents=parents, help="revoke a token: every node refuses it within 2 s")
    revoke.add_argument("id")
    revoke.set_defaults(handler=run_revoke)
    parser.set_defaults(handler=run_without_verb)


def run_without_verb(args: argparse.Namespace, ctx: Context) -> int:
    raise UsageError("token needs a verb: create, list or revoke")


def ttl_seconds(text: str | None) -> int | None:
    """``30d``, ``12h``, ``90m`` (days allowed besides exoctl's usual units) → whole seconds."""
    if text is None:
        return None
    value = text.strip()
    days = value[:-1] if value.endswith("d") else None
    if days is not None and days.replace(".", "", 1).isdigit():
        seconds = float(days) * 86400
    else:
        seconds = parse_duration(value, flag="--ttl")
    if seconds < 1:
        raise UsageError(f"invalid --ttl {text!r}: must be at least 1s")
    return int(seconds)


def create_token(client: Client, *, role: str, description: str, ttl_s: int | None = None) -> dict[str, Any]:
    """Mint a token through ``client`` (an admin's); the answer holds the raw ``token`` once."""
    body: dict[str, Any] = {"role": role, "description": description}
    if ttl_s is not None:
        body["ttlSeconds"] = ttl_s
    return client.request("POST", TOKENS_PATH, body=body)[0]


def _call(ctx: Context, method: str, path: str, body: Any = None) -> dict[str, Any]:
    try:
        return ctx.client.request(method, path, body=body)[0]
    except HttpError as error:
        if error.code == 404 and method == "DELETE":
            raise CliError(f'token "{path.rsplit("/", 1)[-1]}" not found') from None
        raise server_error(error) from None


def run_create(args: argparse.Namespace, ctx: Context) -> int:
    ttl = ttl_seconds(args.ttl)
    try:
        created = create_token(ctx.client, role=args.role, description=args.description, ttl_s=ttl)
    except HttpError as error:
        raise server_error(error) from None
    ctx.out(created["token"])
    ctx.err(f"token {created['id']} ({created['role']}) created"
            + (f", expires {created['expires']}" if created.get("expires") else ""))
    return 0


def run_list(args: argparse.Namespace, ctx: Context) -> int:
    items = _call(ctx, "GET", TOKENS_PATH).get("items", [])
    if args.output == "json":
        ctx.out(json.dumps({"items": items}, indent=2))
        return 0
    rows = [("ID", "ROLE", "STATE", "CREATED", "EXPIRES", "DESCRIPTION")]
    rows += [(t["id"], t["role"], t["state"], t.get("created") or "", t.get("expires") or "never",
              t.get("description") or "") for t in items]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        ctx.out("   ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "   " + row[-1])
    return 0


def run_revoke(args: argparse.Namespace, ctx: Context) -> int:
    revoked = _call(ctx, "DELETE", f"{TOKENS_PATH}/{args.id}")
    ctx.out(f"token {revoked['id']} revoked")
    return 0
