"""``exoctl get TYPE [NAME...] [-o wide|yaml|json|name] [-l SELECTOR] [-w] [-n NS | -A]``."""
from __future__ import annotations

import argparse
from typing import Any

from exo_ctl.api.resources import KindInfo
from exo_ctl.cli import jsonpath, printers
from exo_ctl.cli.common import CliError, Context, UsageError, call, not_found, object_namespace, resolve_targets
from exo_ctl.client import HttpError


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("get", parents=parents, help="list objects or show some by name",
                                   description="Display one or many objects.")
    parser.add_argument("resources", nargs="*", metavar="TYPE [NAME...] | TYPE/NAME...")
    parser.add_argument("-o", "--output", type=printers.output_format,
                        help="wide, yaml, json, name or jsonpath=TEMPLATE (kubectl's JSONPath template)")
    parser.add_argument("--show-managed-fields", action="store_true",
                        help="keep metadata.managedFields in -o yaml|json output")
    parser.add_argument("-l", "--selector", help="label selector, e.g. app=llama,tier!=test")
    parser.add_argument("-w", "--watch", action="store_true", help="after listing, watch for changes")
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="list across all namespaces")
    parser.set_defaults(handler=run)


def no_resources_message(info: KindInfo, ctx: Context, *, all_namespaces: bool) -> str:
    if info.namespaced and not all_namespaces:
        return f"No resources found in {ctx.namespace} namespace."
    return "No resources found"


EVENT_WORDS = ("events", "event", "ev")


def run_events(args: argparse.Namespace, ctx: Context) -> int:
    """``exoctl get events``: what the controllers recorded, oldest first, as kubectl prints it."""
    if len(args.resources) > 1 or args.watch or args.selector:
        raise UsageError("get events takes no names, -l or -w here; use kubectl for those")
    namespace = None if args.all_namespaces else ctx.namespace
    events = call(ctx, lambda: ctx.client.events(namespace=namespace))
    if args.output in ("yaml", "json"):
        ctx.out(printers.render_objects(events, args.output, single=False))
        return 0
    if not events:
        ctx.err("No events found." if args.all_namespaces else f"No events found in {ctx.namespace} namespace.")
        return 0
    columns = [c for c in printers.COLUMNS["Event"] if args.output == "wide" or not c.wide_only]
    if args.all_namespaces:
        columns.insert(0, printers.Column("NAMESPACE", lambda o, n: o["metadata"].get("namespace", "")))
    for line in printers.format_table([c.header for c in columns], printers.table_rows(events, columns, ctx.clock())):
        ctx.out(line)
    return 0


def run(args: argparse.Namespace, ctx: Context) -> int:
    if (args.output or "").startswith(printers.JSONPATH):
        try:
            jsonpath.parse(args.output[len(printers.JSONPATH):])
        except jsonpath.JsonPathError as error:
            raise CliError(f"error parsing jsonpath {args.output[len(printers.JSONPATH):]}: {error}") from None
    if args.resources and args.resources[0].lower() in EVENT_WORDS:
        return run_events(args, ctx)
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
            except HttpError as error:
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
                           show_managed_fields=args.show_managed_fields,
                           empty_message=None if names else no_resources_message(info, ctx, all_namespaces=args.all_namespaces))
    for error in missing:
        ctx.err(error.render())
    if args.watch and not missing:
        watch(ctx, info, names=set(names), namespace=namespace, all_namespaces=args.all_namespaces,
              selector=args.selector, resource_version=resource_version, columns=columns, output=output, widths=widths)
    return 1 if missing else 0


def print_initial(ctx: Context, objects: list[dict[str, Any]], *, columns: list[printers.Column], output: str,
                  single: bool, empty_message: str | None, show_managed_fields: bool = False) -> list[int] | None:
    """Print what was fetched; returns the table's column widths (for rows printed while watching)."""
    if output.startswith(printers.JSONPATH):  # printed as is, without a newline, as kubectl does
        try:
            text = printers.render_objects(objects, output, single=single, show_managed_fields=show_managed_fields)
        except jsonpath.JsonPathError as error:
            raise CliError(f"error executing jsonpath {output[len(printers.JSONPATH):]!r}: {error}") from None
        ctx.stdout.write(text)
        ctx.stdout.flush()
        return None
    if output in ("yaml", "json", "name"):
        if objects or output != "name":
            if objects or not single:
                ctx.out(printers.render_objects(objects, output, single=single,
                                                show_managed_fields=show_managed_fields))
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
                if output.startswith(printers.JSONPATH):
                    ctx.stdout.write(printers.render_objects([obj], output, single=True))
                    ctx.stdout.flush()
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
        except HttpError as error:
            if error.code != 410:
                raise
            resource_version = None  # history compacted: start over from the current state
            continue
        except TimeoutError:
            continue
        if resource_version is None:
            raise CliError("the watch ended before it started")
