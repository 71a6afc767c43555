"""``exoctl wait TYPE/NAME --for=condition=Ready[=True|False] | --for=delete --timeout=DURATION``."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exo_ctl.api.resources import KindInfo
from exo_ctl.cli import printers
from exo_ctl.cli.common import CliError, Context, UsageError, call, not_found, parse_duration, resolve_targets
from exo_ctl.client import HttpError

DEFAULT_TIMEOUT = "30s"


@dataclass(frozen=True)
class WaitFor:
    """What ``--for`` asks: a condition with a status, or the object's deletion."""

    condition: str | None = None
    status: str = "True"

    @property
    def is_delete(self) -> bool:
        return self.condition is None

    def met(self, obj: dict[str, Any] | None) -> bool:
        """Whether the wait is over; raises ``Stalled`` when the object says it will not get there."""
        if self.is_delete:
            return obj is None
        if obj is None:
            return False
        if condition_met(obj, self.condition or "", self.status):
            return True
        if self.condition != "Stalled" and condition_met(obj, "Stalled", "True"):
            found = printers.condition(obj, "Stalled") or {}
            raise Stalled(str(found.get("reason") or "Stalled"), str(found.get("message") or ""))
        return False

    def describe(self) -> str:
        return "deleted" if self.is_delete else "condition met"


class Stalled(Exception):
    """The object reports Stalled=True (kstatus): it will not reach the condition without a change."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason, self.message = reason, message


def condition_met(obj: dict[str, Any], kind: str, status: str) -> bool:
    """The condition has the status, and (when it says which) was judged on the current generation,
    so a wait right after apply does not pass on a stale Ready=True."""
    found = printers.condition(obj, kind)
    if found is None or str(found.get("status", "")).lower() != status.lower():
        return False
    observed = found.get("observedGeneration")
    generation = (obj.get("metadata") or {}).get("generation")
    return observed is None or generation is None or observed >= generation


def parse_for(text: str) -> WaitFor:
    value = text.strip()
    if value == "delete":
        return WaitFor()
    if value.startswith("condition="):
        kind, _, status = value[len("condition="):].partition("=")
        status = status or "True"
        if not kind:
            raise UsageError(f"--for={text}: name a condition, e.g. --for=condition=Ready")
        if status.lower() not in ("true", "false", "unknown"):
            raise UsageError(f"--for={text}: a condition status is True, False or Unknown")
        return WaitFor(kind, status.capitalize())
    raise UsageError(f"--for={text}: expected --for=condition=NAME[=True|False] or --for=delete")


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("wait", parents=parents, help="wait for a condition on objects, or their deletion",
                                   description="Wait until objects have a condition (e.g. Ready) or are deleted.")
    parser.add_argument("resources", nargs="+", metavar="TYPE/NAME... | TYPE NAME...")
    parser.add_argument("--for", dest="wait_for", required=True, metavar="condition=Ready[=True]|delete")
    parser.add_argument("--timeout", default=DEFAULT_TIMEOUT, help="give up after this long (e.g. 30s, 2m); default 30s")
    parser.set_defaults(handler=run)


def wait_for_object(ctx: Context, info: KindInfo, name: str, *, namespace: str | None,
                    done: Callable[[dict[str, Any] | None], bool], deadline: float,
                    require_exists: bool = False) -> bool:
    """True once ``done(object or None)`` holds; False at ``deadline`` (a ``ctx.monotonic`` time).
    Reads the current state, then follows the watch stream; a broken or expired watch re-lists."""
    first = True
    while True:
        listing = call(ctx, lambda: ctx.client.list(info, namespace=namespace))
        current = next((o for o in listing.get("items") or [] if o["metadata"]["name"] == name), None)
        if first and require_exists and current is None:
            raise not_found(info, name)
        first = False
        if done(current):
            return True
        version = (listing.get("metadata") or {}).get("resourceVersion")
        try:
            for event in ctx.client.watch(info, namespace=namespace, resource_version=version, deadline=deadline):
                obj = event.get("object") or {}
                if (obj.get("metadata") or {}).get("name") != name:
                    continue
                if done(None if event.get("type") == "DELETED" else obj):
                    return True
                if ctx.monotonic() >= deadline:
                    return False
        except TimeoutError:
            return False
        except HttpError as error:
            if error.code != 410:
                raise
        if ctx.monotonic() >= deadline:
            return False


def run(args: argparse.Namespace, ctx: Context) -> int:
    wanted = parse_for(args.wait_for)
    timeout = parse_duration(args.timeout)
    targets = resolve_targets(args.resources)
    if any(name is None for _, name in targets):
        raise UsageError("name the objects to wait for, e.g. exoctl wait md/llama --for=condition=Ready")
    deadline = ctx.monotonic() + timeout
    for info, name in targets:
        assert name is not None
        try:
            met = wait_for_object(ctx, info, name, namespace=info.namespaced and ctx.namespace or None,
                                  done=wanted.met, deadline=deadline, require_exists=not wanted.is_delete)
        except Stalled as stalled:
            raise CliError(f"{info.plural}/{name} is Stalled and will not become {wanted.condition}={wanted.status}: "
                           f"{stalled}") from None
        if not met:
            raise CliError(f"timed out waiting for the condition on {info.plural}/{name}")
        ctx.out(f"{info.ref(name)} {wanted.describe()}")
    return 0
