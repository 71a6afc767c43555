"""``exoctl get TYPE [NAME...] [-o wide|yaml|json|name] [-l SELECTOR] [-w] [-n NS | -A]``."""
from __future__ import annotations

import argparse
from typing import Any

from exo_ctl.api.resources import KindInfo
from exo_ctl.cli import printers
from exo_ctl.cli.common import CliError, Context, UsageError, call, not_found, object_namespace, resolve_targets
from exo_ctl.client import ApiError


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("get", parents=parents, help="list objects or show some by name",
                                   description="Display one or many objects.")
    parser.add_argument("resources", nargs="*", metavar="TYPE [NAME...] | TYPE/NAME...")
    parser.add_argument("-o", "--output", choices=printers.OUTPUT_FORMATS, help="wide, yaml, json or name")
    parser.add_argument("-l", "--selector", help="label selector, e.g. app=llama,tier!=test")
    parser.add_argument("-w", "--watch", action="store_true", help="after listing, watch for changes")
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="list across all namespaces")
    parser.set_defaults(handler=run)


def no_resources_message(info: KindInfo, ctx: Context, *, all_namespaces: bool) -> str:
    if info.namespaced and not all_namespaces:
        return f"No resources found in {ctx.namespace} namespace."
    return "No resources found"


def run(args: argparse.Namespace, ctx: Context) -> int:
    targets = resolve_targets(args.resources)
    names = [name for _, name in targets if name is not None]
    if names and args.selector:
        raise UsageError("name cannot be provided when a selector is specified")
    if names and args.all_namespaces:
        raise UsageError("a resource cannot be retrieved by name across all namespaces")
    if len({info.kind for info, _ in targets}) > 1 and args.watch:
        raise UsageError("you may only watch one resource type at a time")
    info = targets[0][0]
    namespace = object_namespace(info, ctx)

    if names:
        resource_version = None
        if args.watch:  # the revision to watch from, taken before the reads so no change is missed
            listing = call(ctx, lambda: ctx.client.list(info, namespace=namespace))
            resource_version = (listing.get("metadata") or {}).get("resourceVersion")
        objects, missing = [], []
        for target_info, name in targets:
            try:
                objects.append(ctx.client.get(target_info, name, namespace=object_namespace(target_info, ctx)))
            except ApiError as error:
                if error.code != 404:
                    raise
                missing.append(not_found(target_info, name))
    else:
        listing = call(ctx, lambda: ctx.client.list(info, namespace=namespace, all_namespaces=args.all_namespaces,
                                                    label_selector=args.selector))
        objects, missing = list(listing.get("items") or []), []
        resource_version = (listing.get("metadata") or {}).get("resourceVersion")

    output = args.output or ""
    columns = printers.table_columns(info, wide=output == "wide", all_namespaces=args.all_namespaces)
    widths = print_initial(ctx, objects, columns=columns, output=output, single=bool(names) and len(targets) == 1,
                           empty_message=None if names else no_resources_message(info, ctx, all_namespaces=args.all_namespaces))
    for error in missing:
        ctx.err(error.render())
    if args.watch and not missing:
        watch(ctx, info, names=set(names), namespace=namespace, all_namespaces=args.all_namespaces,
              selector=args.selector, resource_version=resource_version, columns=columns, output=output, widths=widths)
    return 1 if missing else 0


def print_initial(ctx: Context, objects: list[dict[str, Any]], *, columns: list[printers.Column], output: str,
                  single: bool, empty_message: str | None) -> list[int] | None:
    """Print what was fetched; returns the table's column widths (for rows printed while watching)."""
    if output in ("yaml", "json", "name"):
        if objects or output != "name":
            if objects or not single:
                ctx.out(printers.render_objects(objects, output, single=single))
        return None
    if not objects:
        if empty_message:
            ctx.err(empty_message)
        return None
    headers = [c.header for c in columns]
    rows = printers.table_rows(objects, columns, ctx.clock())
    widths = printers.column_widths([headers, *rows])
    for row in [headers, *rows]:
        ctx.out(printers.format_row(row, widths))
    return widths


def watch(ctx: Context, info: KindInfo, *, names: set[str], namespace: str | None, all_namespaces: bool,
          selector: str | None, resource_version: str | None, columns: list[printers.Column], output: str,
          widths: list[int] | None) -> None:
    """Print each change as it arrives, until interrupted (Ctrl-C) or the API goes away."""
    headers = [c.header for c in columns]
    while True:
        try:
            for event in ctx.client.watch(info, namespace=namespace, all_namespaces=all_namespaces,
                                          resource_version=resource_version, label_selector=selector):
                obj = event.get("object") or {}
                meta = obj.get("metadata") or {}
                resource_version = meta.get("resourceVersion") or resource_version
                if names and meta.get("name") not in names:
                    continue
                if output in ("yaml", "json", "name"):
                    text = printers.render_objects([obj], output, single=True)
                    ctx.out(("---\n" + text) if output == "yaml" else text)
                    continue
                row = printers.table_rows([obj], columns, ctx.clock())[0]
                if widths is None:
                    widths = printers.column_widths([headers, row])
                    ctx.out(printers.format_row(headers, widths))
                widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
                ctx.out(printers.format_row(row, widths))
        except ApiError as error:
            if error.code != 410:
                raise
            resource_version = None  # history compacted: start over from the current state
            continue
        except TimeoutError:
            continue
        if resource_version is None:
            raise CliError("the watch ended before it started")
