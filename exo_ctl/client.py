"""A small synchronous client for the exo control-plane API (standard library only), and the
resolution of which server and token to use."""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from exo_ctl.api.resources import KindInfo
from exo_ctl.http import (DEFAULT_TIMEOUT, HttpError, Cause, ClientConfigError, ConnectionFailed,  # noqa: F401 (re-exported)
                          HttpClient)
from exo_ctl.sse import json_lines

DEFAULT_SERVER = "http://127.0.0.1:52415"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
APPLY_RESULT_HEADER = "X-Exo-Apply-Result"
PATCH_CONTENT_TYPES = {"merge": "application/merge-patch+json", "strategic": "application/strategic-merge-patch+json",
                       "json": "application/json-patch+json"}
OP_ID_HEADER = "X-Exo-Op-Id"


# --- configuration ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientConfig:
    server: str = DEFAULT_SERVER
    token: str | None = None
    timeout: float | None = DEFAULT_TIMEOUT
    sources: dict[str, str] = field(default_factory=dict)  # where server/token came from
    ca: str | None = None  # the cluster CA (PEM file): the only issuer an https:// server may present


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/exoctl/config.yaml``, or ``~/.config/exoctl/config.yaml``."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "exoctl" / "config.yaml"


def read_config_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ClientConfigError(f"cannot read {path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ClientConfigError(f"{where}: invalid YAML in the exoctl config file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ClientConfigError(f"{path}: the exoctl config must be a mapping with keys server and token")
    out: dict[str, str] = {}
    for key in ("server", "token", "ca"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ClientConfigError(f"{path}: {key} must be a string, got {type(value).__name__}")
        out[key] = value
    return out


def normalize_server(server: str) -> str:
    """``host:port`` → ``http://host:port``; refuses anything that is not an http(s) URL."""
    text = server.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    try:
        parts.port
    except ValueError:
        raise ClientConfigError(f"invalid server URL {server!r}: bad port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ClientConfigError(f"invalid server URL {server!r} (expected http://HOST:PORT)")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def load_config(*, server: str | None = None, token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                env: Mapping[str, str] | None = None, path: Path | None = None, ca: str | None = None) -> ClientConfig:
    """Flags first, then ``EXOCTL_SERVER``/``EXOCTL_TOKEN``, then the config file, then the default."""
    env = os.environ if env is None else env
    path = path or config_path(env)
    from_file: dict[str, str] | None = None
    chosen: dict[str, str | None] = {}
    sources: dict[str, str] = {}
    for key, flag, variable in (("server", server, "EXOCTL_SERVER"), ("token", token, "EXOCTL_TOKEN"),
                                ("ca", ca, "EXOCTL_CA")):
        if flag:
            chosen[key], sources[key] = flag, f"--{key}"
        elif env.get(variable):
            chosen[key], sources[key] = env[variable], variable
        else:
            if from_file is None:
                from_file = read_config_file(path)
            if from_file.get(key):
                chosen[key], sources[key] = from_file[key], str(path)
    return ClientConfig(server=normalize_server(chosen.get("server") or DEFAULT_SERVER),
                        token=chosen.get("token"), timeout=timeout, sources=sources, ca=chosen.get("ca"))


def save_config(*, server: str, token: str | None, path: Path | None = None,
                env: Mapping[str, str] | None = None, ca: str | None = None) -> Path:
    """Write the config file (mode 0600: it holds the cluster secret) and return its path."""
    path = path or config_path(env)
    data = {"server": normalize_server(server)}
    if token:
        data["token"] = token
    if ca:
        data["ca"] = str(Path(ca).resolve())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        yaml.safe_dump(data, stream, default_flow_style=False, sort_keys=False)
    os.replace(temporary, path)
    return path


# --- transport -------------------------------------------------------------------------------

def _selector_query(label_selector: str | None) -> dict[str, str]:
    return {"labelSelector": label_selector} if label_selector else {}


class Client:
    """One method per API verb. Every failure is HttpError (the server answered) or
    ConnectionFailed (it could not be reached)."""

    def __init__(self, config: ClientConfig, *, write_retries: int = 2,
                 sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.write_retries = write_retries
        self._sleep = sleep
        self.http = HttpClient(config.server, token=config.token, ca=config.ca, timeout=config.timeout,
                               hint=" — is a node running? set --server or EXOCTL_SERVER")

    def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None, body: Any = None,
                content_type: str = "application/json",
                op_id: str | None = None) -> tuple[dict[str, Any], Mapping[str, str]]:
        """One request; returns the decoded JSON answer and the response headers. A write carries
        an op id (``op_id``, or a new one) and is retried with the same id when its outcome is
        unknown (504) or the node briefly has no quorum (503), so it applies at most once; pass
        the same ``op_id`` to retry it yourself, through another node too."""
        payload = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {} if method == "GET" else {OP_ID_HEADER: op_id or uuid.uuid4().hex}
        attempt = 0
        while True:
            try:
                return self._request_once(method, path, query=query, body=payload, content_type=content_type,
                                          headers=headers)
            except HttpError as error:
                if method == "GET" or error.code not in (503, 504) or attempt >= self.write_retries:
                    raise
                attempt += 1
                self._sleep(min(error.retry_after or 1.0, 2.0) if error.code == 503 else 0.2)

    def _request_once(self, method: str, path: str, *, query: Mapping[str, str] | None, body: bytes | None,
                      content_type: str, headers: Mapping[str, str]) -> tuple[dict[str, Any], Mapping[str, str]]:
        return self.http.request_json(method, path, query=query, body=body, headers=headers,
                                      content_type=content_type if body is not None else None)

    # -- verbs --
    def get(self, info: KindInfo, name: str, *, namespace: str | None = None) -> dict[str, Any]:
        return self.request("GET", info.path(namespace, name))[0]

    def list(self, info: KindInfo, *, namespace: str | None = None, all_namespaces: bool = False,
             label_selector: str | None = None) -> dict[str, Any]:
        return self.request("GET", self.collection(info, namespace=namespace, all_namespaces=all_namespaces),
                            query=_selector_query(label_selector))[0]

    def create(self, info: KindInfo, obj: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        namespace = obj["metadata"].get("namespace")
        return self.request("POST", info.path(namespace), body=obj, query=_dry_run(dry_run))[0]

    def replace(self, info: KindInfo, obj: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        meta = obj["metadata"]
        return self.request("PUT", info.path(meta.get("namespace"), meta["name"]), body=obj, query=_dry_run(dry_run))[0]

    def apply(self, info: KindInfo, obj: dict[str, Any], *, dry_run: bool = False) -> tuple[dict[str, Any], str]:
        """Server-side apply of a manifest; returns the resulting object and created|configured|unchanged."""
        answer, action, _ = self.apply_with_headers(info, obj, dry_run=dry_run)
        return answer, action

    def apply_with_headers(self, info: KindInfo, obj: dict[str, Any], *,
                           dry_run: bool = False) -> tuple[dict[str, Any], str, Mapping[str, str]]:
        """``apply`` plus the response headers (a dry run of a ModelDeployment carries X-Exo-Placement)."""
        meta = obj["metadata"]
        answer, headers = self.request("PATCH", info.path(meta.get("namespace"), meta["name"]),
                                       body=json.dumps(obj).encode(), content_type=APPLY_CONTENT_TYPE,
                                       query=_dry_run(dry_run))
        action = next((v for k, v in headers.items() if k.lower() == APPLY_RESULT_HEADER.lower()), "configured")
        return answer, action, headers

    def delete(self, info: KindInfo, name: str, *, namespace: str | None = None, dry_run: bool = False,
               resource_version: str | None = None, uid: str | None = None) -> dict[str, Any]:
        preconditions = {k: v for k, v in (("resourceVersion", resource_version), ("uid", uid)) if v}
        body = {"preconditions": preconditions} if preconditions else None
        return self.request("DELETE", info.path(namespace, name), body=body, query=_dry_run(dry_run))[0]

    def patch(self, info: KindInfo, name: str, patch: Any, *, namespace: str | None = None,
              patch_type: str = "merge", subresource: str = "") -> dict[str, Any]:
        """PATCH with a merge, strategic merge or JSON patch (``patch_type`` merge|strategic|json)."""
        media = PATCH_CONTENT_TYPES[patch_type]
        path = info.path(namespace, name) + (f"/{subresource}" if subresource else "")
        return self.request("PATCH", path, body=patch, content_type=media)[0]

    def events(self, *, namespace: str | None = None, field_selector: str | None = None) -> list[dict[str, Any]]:
        """core/v1 Events of one namespace (None: of all), oldest first by when they were last seen."""
        path = f"/api/v1/namespaces/{namespace}/events" if namespace else "/api/v1/events"
        listing = self.request("GET", path, query={"fieldSelector": field_selector} if field_selector else None)[0]
        return sorted(listing.get("items") or [], key=lambda e: (e.get("lastTimestamp") or "", e["metadata"]["name"]))

    def events_for(self, obj: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The Events whose involvedObject is ``obj`` (what describe shows)."""
        meta = obj["metadata"]
        selector = f"involvedObject.kind={obj['kind']},involvedObject.name={meta['name']}"
        if meta.get("uid"):
            selector += f",involvedObject.uid={meta['uid']}"
        return self.events(namespace=meta.get("namespace"), field_selector=selector)

    def collection(self, info: KindInfo, *, namespace: str | None, all_namespaces: bool = False) -> str:
        if info.namespaced and all_namespaces:
            return f"/apis/exo.dev/v1alpha1/{info.plural}"
        return info.path(namespace)

    def watch(self, info: KindInfo, *, namespace: str | None = None, all_namespaces: bool = False,
              resource_version: str | None = None, label_selector: str | None = None,
              deadline: float | None = None) -> Iterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``) as they arrive, until the server ends the stream.
        Past ``deadline`` (a ``time.monotonic()`` instant) it raises TimeoutError; an ERROR event
        raises HttpError."""
        query = {"watch": "1", **_selector_query(label_selector)}
        if resource_version:
            query["resourceVersion"] = str(resource_version)
        path = self.collection(info, namespace=namespace, all_namespaces=all_namespaces)
        response = self.http.open("GET", path, query=query)
        for event in json_lines(response.lines(deadline=deadline, forever=deadline is None)):
            if event.get("type") == "ERROR":
                status = event.get("object") or {}
                raise HttpError.from_response(int(status.get("code") or 500), json.dumps(status).encode())
            yield event


def _dry_run(dry_run: bool) -> dict[str, str]:
    return {"dryRun": "All"} if dry_run else {}
