"""Reading request bodies: size limit, media types, JSON/YAML with errors that name the line."""
from __future__ import annotations

import json
from typing import Any

import yaml
from aiohttp import web

from reconciler.server.errors import ApiError

MAX_BODY_BYTES = 1024 * 1024
APPLY_PATCH = "application/apply-patch+yaml"
JSON_TYPES = ("application/json", "")
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")


class _ManifestLoader(yaml.SafeLoader):
    """Safe YAML that keeps timestamps as strings (as kubectl's YAML-to-JSON conversion does) and
    refuses aliases, so a small body cannot expand into a huge object."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not supported in manifests", mark)
        return super().compose_node(parent, index)


_NO_TIMESTAMPS = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ManifestLoader.yaml_implicit_resolvers = _NO_TIMESTAMPS

if hasattr(yaml, "CSafeLoader"):
    class _FastManifestLoader(yaml.CSafeLoader):  # libyaml: parsing in C is ~10x faster
        """The same rules as _ManifestLoader; aliases are refused by a scan before loading."""

    _FastManifestLoader.yaml_implicit_resolvers = _NO_TIMESTAMPS
else:  # PyYAML built without libyaml
    _FastManifestLoader = None  # type: ignore[assignment,misc]


def _load_documents(text: str) -> list[Any]:
    if _FastManifestLoader is None:
        return [doc for doc in yaml.load_all(text, Loader=_ManifestLoader) if doc is not None]
    for token in yaml.scan(text, Loader=_FastManifestLoader):
        if isinstance(token, yaml.AliasToken):
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not supported in manifests",
                                              token.start_mark)
    return [doc for doc in yaml.load_all(text, Loader=_FastManifestLoader) if doc is not None]


async def read_body(request: web.Request, *, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, or 413 when it is larger than ``limit`` (checked before and while reading)."""
    too_large = ApiError(413, f"request body is larger than the limit of {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"request body is not UTF-8 text (byte {error.start})") from None


def parse_json(raw: bytes) -> Any:
    text = _text(raw)
    if not text.strip():
        raise ApiError(400, "request body is empty; send a JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiError(400, f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None


def parse_yaml(raw: bytes) -> Any:
    text = _text(raw)
    if not text.strip():
        raise ApiError(400, "request body is empty; send a YAML or JSON manifest")
    try:
        documents = _load_documents(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ApiError(400, f"invalid YAML{where}: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise ApiError(400, f"invalid YAML: {error}") from None
    except RecursionError:
        raise ApiError(400, "invalid YAML: nested too deeply") from None
    if len(documents) != 1:
        raise ApiError(400, f"expected exactly one YAML document, got {len(documents)}")
    return documents[0]


def media_type(request: web.Request) -> str:
    return request.content_type.lower() if request.headers.get("Content-Type") else ""


async def object_body(request: web.Request) -> Any:
    """A JSON (or YAML) body for create/replace/status."""
    kind = media_type(request)
    if kind not in JSON_TYPES + YAML_TYPES:
        raise ApiError(415, f"unsupported Content-Type {kind!r}: send application/json or application/yaml")
    raw = await read_body(request)
    return parse_yaml(raw) if kind in YAML_TYPES else parse_json(raw)


PATCH_MEDIA_TYPES = (APPLY_PATCH, "application/merge-patch+json", "application/strategic-merge-patch+json",
                     "application/json-patch+json")


async def patch_body(request: web.Request) -> tuple[str, Any]:
    """(media type, parsed body) of a PATCH: a server-side apply manifest (YAML, or JSON which is
    YAML too), a merge or strategic merge patch, or a JSON patch."""
    kind = media_type(request)
    if kind not in PATCH_MEDIA_TYPES:
        raise ApiError(415, f"unsupported patch type {kind!r}: send one of {', '.join(PATCH_MEDIA_TYPES)}")
    raw = await read_body(request)
    return kind, parse_yaml(raw) if kind == APPLY_PATCH else parse_json(raw)


async def optional_json_body(request: web.Request) -> Any | None:
    """A body that may be absent (DeleteOptions)."""
    raw = await read_body(request)
    if not raw.strip():
        return None
    return parse_json(raw)
