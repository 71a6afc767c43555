"""The one reader of streamed answers: server-sent events (the OpenAI streams) and JSON lines (the
watch streams of ``exoctl get -w``), both over the lines of an ``exo_ctl.http.Response``."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from exo_ctl.http import HttpError, ConnectionFailed

DONE = "[DONE]"


class StreamCut(ConnectionFailed):
    """The stream ended before its end marker (``data: [DONE]``)."""


@dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


def _text(line: bytes | str) -> str:
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    return text.rstrip("\r\n")


def events(lines: Iterable[bytes | str]) -> Iterator[ServerSentEvent]:
    """Server-sent events as the HTML spec frames them: ``field: value`` lines up to a blank line,
    ``data`` lines joined with newlines, ``:`` comments (keep-alives) skipped. An event the stream
    ends inside of is dropped, as the spec says."""
    data: list[str] = []
    kind, ident = "", None
    for raw in lines:
        line = _text(raw)
        if not line:
            if data:
                yield ServerSentEvent("\n".join(data), kind or "message", ident)
            data, kind = [], ""
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            kind = value
        elif name == "id":
            ident = value


def data(lines: Iterable[bytes | str], *, until_done: bool = True, raise_errors: bool = True) -> Iterator[Any]:
    """The JSON payloads of an OpenAI-style stream, up to ``data: [DONE]``. An ``error`` event or a
    payload ``{"error": {...}}`` raises HttpError (``raise_errors=False``: is yielded like the
    others); with ``until_done``, an end without ``[DONE]`` raises StreamCut."""
    for event in events(lines):
        if event.data == DONE:
            return
        try:
            payload = json.loads(event.data)
        except ValueError:
            raise HttpError(200, "BadResponse", f"the stream sent an event that is not JSON: {event.data[:80]!r}") from None
        error = payload.get("error") if isinstance(payload, dict) else None
        if raise_errors and (event.event == "error" or isinstance(error, dict)):
            body = error if isinstance(error, dict) else (payload if isinstance(payload, dict) else {})
            code = body.get("code")
            raise HttpError.from_error_body(code if isinstance(code, int) and code >= 400 else 500, body)
        yield payload
    if until_done:
        raise StreamCut("the stream ended before data: [DONE] (the server closed it mid-answer)")


def json_lines(lines: Iterable[bytes | str]) -> Iterator[Any]:
    """One JSON document per non-blank line (a watch stream, or NDJSON)."""
    for raw in lines:
        line = _text(raw).strip()
        if not line:
            continue
        try:
            yield json.loads(line)
        except ValueError:
            raise HttpError(200, "BadResponse", "the stream sent a line that is not JSON") from None
