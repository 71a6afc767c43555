"""``exoctl delete TYPE NAME... | -f FILE [--wait] [--timeout DURATION]``."""
from __future__ import annotations

import argparse
from typing import Any

from exo_ctl.api.resources import KindInfo
from exo_ctl.cli.apply import DRY_RUN_SUFFIX, add_file_arguments, load
from exo_ctl.cli.common import CliError, Context, UsageError, not_found, parse_duration, resolve_targets, server_error
from exo_ctl.cli.wait import wait_for_object
from exo_ctl.client import HttpError

DEFAULT_TIMEOUT = "60s"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("delete", parents=parents, help="delete objects by name or by manifest",
                                   description="Delete objects named on the command line or in manifests.")
    parser.add_argument("resources", nargs="*", metavar="TYPE NAME... | TYPE/NAME...")
    add_file_arguments(parser, required=False)
    parser.add_argument("--wait", nargs="?", const=True, default=False, type=_bool, metavar="true|false",
                        help="wait until the objects are gone")
    parser.add_argument("--timeout", default=DEFAULT_TIMEOUT, help="how long --wait waits (e.g. 30s, 2m); default 60s")
    parser.add_argument("--ignore-not-found", action="store_true", help="treat objects that do not exist as deleted")
    parser.add_argument("--dry-run", nargs="?", const="client", default="none", choices=("none", "client", "server"))
    parser.set_defaults(handler=run)


def _targets(args: argparse.Namespace, ctx: Context) -> list[tuple[KindInfo, str, str | None]]:
    if args.filename and args.resources:
        raise UsageError("give either -f FILE or TYPE NAME, not both")
    if args.filename:
        return [(m.info, m.name, m.namespace) for m in load(ctx, args.filename, recursive=args.recursive)]
    targets = resolve_targets(args.resources)
    if any(name is None for _, name in targets):
        raise UsageError("name the objects to delete (TYPE NAME, TYPE/NAME or -f FILE); deleting all is not supported")
    return [(info, name or "", ctx.namespace if info.namespaced else None) for info, name in targets]


def run(args: argparse.Namespace, ctx: Context) -> int:
    timeout = parse_duration(args.timeout)
    targets = _targets(args, ctx)
    if not targets:
        raise CliError("no objects passed to delete")
    suffix = DRY_RUN_SUFFIX[args.dry_run]
    failed = False
    deleted: list[tuple[KindInfo, str, str | None, str | None]] = []
    for info, name, namespace in targets:
        try:
            if args.dry_run == "client":
                obj = ctx.client.get(info, name, namespace=namespace)
            else:
                obj = ctx.client.delete(info, name, namespace=namespace, dry_run=args.dry_run == "server")
        except HttpError as error:
            if error.code == 404 and args.ignore_not_found:
                continue
            failed = True
            ctx.err((not_found(info, name) if error.code == 404 else server_error(error, info=info, name=name)).render())
            continue
        ctx.out(f'{info.singular}.exo.dev "{name}" deleted{suffix}')
        deleted.append((info, name, namespace, (obj.get("metadata") or {}).get("uid")))
    if args.wait and args.dry_run == "none":
        deadline = ctx.monotonic() + timeout
        for info, name, namespace, uid in deleted:
            gone = wait_for_object(ctx, info, name, namespace=namespace, deadline=deadline,
                                   done=lambda obj, uid=uid: obj is None or (uid is not None and obj["metadata"].get("uid") != uid))
            if not gone:
                raise CliError(f"timed out waiting for the deletion of {info.plural}/{name}")
    return 1 if failed else 0
