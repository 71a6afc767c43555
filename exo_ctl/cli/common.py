"""What every command shares: the error types, the invocation context (client, namespace, clock,
streams), resource-type resolution, durations and server-error formatting."""
from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from exo_ctl.api.resources import DEFAULT_NAMESPACE, KINDS, KindInfo, kind_for
from exo_ctl.client import HttpError, Client, ClientConfig

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """A user-facing failure: printed as ``error: MESSAGE`` (or verbatim when ``raw``)."""

    def __init__(self, message: str, *, raw: bool = False, code: int = EXIT_ERROR):
        super().__init__(message)
        self.message, self.raw, self.code = message, raw, code

    def render(self) -> str:
        return self.message if self.raw else f"error: {self.message}"


class UsageError(CliError):
    """A bad command line (unknown flag, bad value)."""

    def __init__(self, message: str):
        super().__init__(message, code=EXIT_USAGE)


@dataclass
class Context:
    """One invocation: how to reach the API and where to print. ``namespace_given`` tells an
    explicit ``-n`` from the default."""

    config: ClientConfig
    namespace: str = DEFAULT_NAMESPACE
    namespace_given: bool = False
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)
    stdin: IO[bytes] | None = None
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    _client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.config)
        return self._client

    def out(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def err(self, text: str) -> None:
        self.stderr.write(text + "\n")
        self.stderr.flush()


# --- resource types --------------------------------------------------------------------------

def resolve_type(word: str) -> KindInfo:
    info = kind_for(word.strip())
    if info is None:
        known = ", ".join(f"{i.plural} ({'/'.join(i.short_names) or i.singular})" for i in KINDS.values())
        raise CliError(f'the server doesn\'t have a resource type "{word}" (known types: {known})')
    return info


def resolve_targets(words: list[str]) -> list[tuple[KindInfo, str | None]]:
    """``TYPE [NAME...]`` or ``TYPE/NAME [TYPE/NAME...]`` → (kind, name) pairs (name None = all)."""
    if not words:
        raise UsageError("you must specify the type of resource, e.g. 'modeldeployments' (md), 'nodes' (no) or 'shards'")
    if "/" in words[0]:
        targets = []
        for word in words:
            kind, _, name = word.partition("/")
            if not kind or not name or "/" in name:
                raise UsageError(f"{word!r}: expected TYPE/NAME (e.g. md/llama); do not mix TYPE/NAME with plain names")
            targets.append((resolve_type(kind), name))
        return targets
    info = resolve_type(words[0])
    if len(words) == 1:
        return [(info, None)]
    for name in words[1:]:
        if "/" in name:
            raise UsageError(f"{name!r}: there is no need to repeat the type when one is given ({words[0]} NAME...)")
    return [(info, name) for name in words[1:]]


def object_namespace(info: KindInfo, ctx: Context) -> str | None:
    return ctx.namespace if info.namespaced else None


# --- durations -------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, *, flag: str = "--timeout") -> float:
    """Seconds from ``30s``, ``2m``, ``1h30m``, ``500ms`` or a plain number of seconds."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if seconds < 0:
            raise UsageError(f"invalid {flag} {text!r}: must not be negative")
        return seconds
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not value or position != len(value):
        raise UsageError(f"invalid {flag} {text!r}: expected a duration such as 30s, 2m, 1h30m or 500ms")
    return total


def format_duration(seconds: float) -> str:
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


# --- server errors ---------------------------------------------------------------------------

def not_found(info: KindInfo, name: str) -> CliError:
    return CliError(f'Error from server (NotFound): {info.plural}.exo.dev "{name}" not found', raw=True)


def server_error(error: HttpError, *, info: KindInfo | None = None, name: str | None = None,
                 where: str | None = None) -> CliError:
    """kubectl's ``Error from server (Reason): message`` line, with causes and the manifest place."""
    if error.code == 401:
        return CliError("unauthorized — the API rejected the token; set --token or EXOCTL_TOKEN to a role token "
                        f"(exoctl token create): {error.message}")
    if error.code == 404 and info is not None and name is not None:
        return not_found(info, name)
    prefix = f"{where}: " if where else ""
    message = error.message
    if error.causes and not all(str(c) in message for c in error.causes):
        message += ": " + "; ".join(str(c) for c in error.causes)
    if error.code == 503:
        message += " (the node has no quorum; retry shortly or ask another node)"
    return CliError(f"{prefix}Error from server ({error.reason}): {message}", raw=not where)


def call(ctx: Context, action: Callable[[], Any], *, info: KindInfo | None = None, name: str | None = None,
         where: str | None = None) -> Any:
    """Run one API call, turning HttpError into a CliError line."""
    try:
        return action()
    except HttpError as error:
        raise server_error(error, info=info, name=name, where=where) from None
