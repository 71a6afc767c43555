"""``exoctl apply`` (server-side apply, dry runs, ``--prune``) and ``exoctl diff``."""
from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Mapping
from typing import Any

from exo_ctl.api.resources import KINDS, KindInfo, object_key
from exo_ctl.api.selectors import SelectorError, parse_selector
from exo_ctl.cli import printers
from exo_ctl.cli.common import CliError, Context, UsageError, call
from exo_ctl.cli.plan import placement_from_headers, render_placement
from exo_ctl.client import HttpError
from exo_ctl.manifests import Manifest, ManifestError, load_manifests

DRY_RUN_SUFFIX = {"none": "", "client": " (dry run)", "server": " (server dry run)"}


def add_file_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("-f", "--filename", action="append", default=[], required=required, metavar="FILE|DIR|-",
                        help="manifest file, directory of manifests, or - for stdin (repeatable)")
    parser.add_argument("-R", "--recursive", action="store_true", help="descend into subdirectories of -f DIR")


def add_parsers(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    apply = subparsers.add_parser("apply", parents=parents, help="create or update objects from manifests",
                                  description="Apply manifests: every document is validated before anything is written.")
    add_file_arguments(apply)
    apply.add_argument("--dry-run", nargs="?", const="client", default="none", choices=("none", "client", "server"),
                       help="client: only say what would happen; server: let the API compute it without saving")
    apply.add_argument("--prune", action="store_true",
                       help="delete applied objects (matching -l) that are no longer in the manifests")
    apply.add_argument("-l", "--selector", help="only apply (and prune) objects with these labels")
    apply.add_argument("-o", "--output", choices=("name", "yaml", "json"))
    apply.set_defaults(handler=run_apply)

    diff = subparsers.add_parser("diff", parents=parents, help="show what apply would change (exit 1 when it would)",
                                 description="Diff live objects against what apply would make of the manifests. "
                                             "Exit status: 0 no changes, 1 changes, 2 error.")
    add_file_arguments(diff)
    diff.set_defaults(handler=run_diff, error_code=2)


def load(ctx: Context, files: list[str], *, recursive: bool) -> list[Manifest]:
    """Every manifest, validated; any bad document anywhere stops the command before any write."""
    try:
        return load_manifests(files, recursive=recursive, namespace=ctx.namespace if ctx.namespace_given else None,
                              stdin=ctx.stdin)
    except ManifestError as error:
        lines = [line if line.startswith(" ") else f"error: {line}" for line in error.problems]
        raise CliError("\n".join(lines), raw=True) from None


def select(manifests: list[Manifest], selector: str | None) -> list[Manifest]:
    if not selector:
        return manifests
    try:
        parsed = parse_selector(selector)
    except SelectorError as error:
        raise UsageError(str(error)) from None
    return [m for m in manifests if parsed.matches(m.object["metadata"].get("labels"))]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def client_apply_action(live: Mapping[str, Any] | None, manifest: Mapping[str, Any]) -> str:
    """What a real apply would answer, judged on the client: created, configured or unchanged."""
    if live is None:
        return "created"
    if _canonical(live.get("spec")) != _canonical(manifest.get("spec")):
        return "configured"
    live_meta, new_meta = live.get("metadata") or {}, manifest.get("metadata") or {}
    try:
        previous = json.loads((live_meta.get("annotations") or {}).get(printers.LAST_APPLIED, "{}"))
    except ValueError:
        previous = {}
    previous_meta = previous.get("metadata") or {} if isinstance(previous, dict) else {}
    for field in ("labels", "annotations"):
        have, want = live_meta.get(field) or {}, new_meta.get(field) or {}
        if any(have.get(key) != value for key, value in want.items()):
            return "configured"
        dropped = set(previous_meta.get(field) or {}) - set(want) - {printers.LAST_APPLIED}
        if dropped & set(have):
            return "configured"
    return "unchanged"


def _get_or_none(ctx: Context, manifest: Manifest) -> dict[str, Any] | None:
    try:
        return ctx.client.get(manifest.info, manifest.name, namespace=manifest.namespace)
    except HttpError as error:
        if error.code == 404:
            return None
        raise


def _print_results(ctx: Context, results: list[tuple[dict[str, Any], str]], *, output: str | None) -> None:
    if output in ("yaml", "json"):
        objects = [obj for obj, _ in results]
        if objects:
            ctx.out(printers.render_objects(objects, output, single=True))


def run_apply(args: argparse.Namespace, ctx: Context) -> int:
    if args.prune and not args.selector:
        raise UsageError("--prune needs a label selector (-l KEY=VALUE) naming the objects this set of manifests owns; "
                         "without one it could delete objects applied from elsewhere")
    manifests = select(load(ctx, args.filename, recursive=args.recursive), args.selector)
    if not manifests:
        raise CliError("no objects passed to apply" + (f" (none match -l {args.selector})" if args.selector else ""))
    suffix = DRY_RUN_SUFFIX[args.dry_run]
    results: list[tuple[dict[str, Any], str]] = []
    failures: list[CliError] = []
    for manifest in manifests:
        ref = manifest.info.ref(manifest.name)
        try:
            if args.dry_run == "client":
                live = call(ctx, lambda: _get_or_none(ctx, manifest), where=manifest.where)
                obj, action, headers = manifest.object, client_apply_action(live, manifest.object), {}
            else:
                obj, action, headers = call(ctx, lambda: ctx.client.apply_with_headers(
                    manifest.info, manifest.object, dry_run=args.dry_run == "server"), where=manifest.where)
        except CliError as error:
            failures.append(error)
            ctx.err(error.render())
            continue
        results.append((obj, action))
        if args.output == "name":
            ctx.out(ref)
        elif args.output is None:
            ctx.out(f"{ref} {action}{suffix}")
            plan = placement_from_headers(headers) if args.dry_run == "server" else None
            for line in render_placement(plan) if plan is not None else []:
                ctx.out(line)
    if args.prune and not failures:
        prune(ctx, manifests, selector=args.selector, dry_run=args.dry_run, output=args.output)
    _print_results(ctx, results, output=args.output)
    return 1 if failures else 0


def prune_scope(manifests: list[Manifest], default_namespace: str) -> list[tuple[KindInfo, str | None]]:
    """(kind, namespace) pairs that prune looks at: the applied kinds plus every user-writable
    kind, in the namespaces the manifests used (or the current one)."""
    kinds = [m.info for m in manifests] + [info for info in KINDS.values() if info.user_writable]
    namespaces = sorted({m.namespace for m in manifests if m.info.namespaced and m.namespace}) or [default_namespace]
    scope: list[tuple[KindInfo, str | None]] = []
    for info in dict.fromkeys(kinds):
        for namespace in (namespaces if info.namespaced else [None]):
            scope.append((info, namespace))
    return scope


def prune_candidates(live: list[dict[str, Any]], applied: set[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Objects that an earlier apply created (they carry exoctl's or kubectl's last-applied
    annotation, so one GitOps folder can be applied by either) and that the manifests no longer contain."""
    return [obj for obj in live
            if {printers.LAST_APPLIED, printers.KUBECTL_LAST_APPLIED} & set((obj.get("metadata") or {}).get("annotations") or {})
            and object_key(obj) not in applied]


def prune(ctx: Context, manifests: list[Manifest], *, selector: str, dry_run: str, output: str | None) -> None:
    applied = {m.key for m in manifests}
    suffix = DRY_RUN_SUFFIX[dry_run]
    for info, namespace in prune_scope(manifests, ctx.namespace):
        listing = call(ctx, lambda: ctx.client.list(info, namespace=namespace, label_selector=selector))
        for obj in prune_candidates(list(listing.get("items") or []), applied):
            name = obj["metadata"]["name"]
            if dry_run != "client":
                try:
                    ctx.client.delete(info, name, namespace=namespace, dry_run=dry_run == "server",
                                      uid=obj["metadata"].get("uid"))
                except HttpError as error:
                    if error.code == 404:
                        continue
                    raise
            if output != "yaml" and output != "json":
                ctx.out(info.ref(name) if output == "name" else f"{info.ref(name)} pruned{suffix}")


# --- diff ------------------------------------------------------------------------------------

def comparable(obj: Mapping[str, Any] | None) -> str:
    """YAML of an object for diffing, without fields that change on every write."""
    if obj is None:
        return ""
    clean = json.loads(json.dumps(obj))
    meta = clean.get("metadata") or {}
    meta.pop("resourceVersion", None)
    meta.pop("managedFields", None)  # changes on every write, as kubectl diff leaves it out
    annotations = meta.get("annotations") or {}
    annotations.pop(printers.LAST_APPLIED, None)
    if not annotations:
        meta.pop("annotations", None)
    return printers.to_yaml(clean)


def object_diff(live: Mapping[str, Any] | None, merged: Mapping[str, Any], *, label: str) -> str:
    lines = difflib.unified_diff(comparable(live).splitlines(keepends=True), comparable(merged).splitlines(keepends=True),
                                 fromfile=f"live/{label}", tofile=f"merged/{label}")
    return "".join(lines)


def run_diff(args: argparse.Namespace, ctx: Context) -> int:
    manifests = load(ctx, args.filename, recursive=args.recursive)
    if not manifests:
        raise CliError("no objects passed to diff", code=2)
    changed = False
    for manifest in manifests:
        live = call(ctx, lambda: _get_or_none(ctx, manifest), where=manifest.where)
        merged, _ = call(ctx, lambda: ctx.client.apply(manifest.info, manifest.object, dry_run=True),
                         where=manifest.where)
        namespace = f"{manifest.namespace}/" if manifest.namespace else ""
        text = object_diff(live, merged, label=f"{namespace}{manifest.info.ref(manifest.name)}")
        if text:
            changed = True
            ctx.stdout.write(text if text.endswith("\n") else text + "\n")
    ctx.stdout.flush()
    return 1 if changed else 0
