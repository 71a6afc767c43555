"""A model's metadata and bytes read off a Hugging Face hub, through huggingface_hub's own client.

``hub_model_info`` builds the ModelInfo of ``hf://ORG/NAME`` from the hub alone: the repo's file
list with sizes and LFS sha256s (``HfApi.model_info(files_metadata=True)``), ``config.json``, and
the JSON header of every safetensors file read with HTTP Range requests, so a few kilobytes per
file travel, never the weights. ``HubReader`` reads byte ranges (a stage's tensors) and small
files. Nothing is written to the Hugging Face cache: a snapshot holding only config.json would
look like a local copy of the model.

The endpoint (``HF_ENDPOINT``), token (``HF_TOKEN`` or the saved login) and offline switch
(``HF_HUB_OFFLINE``) are read at each call, so a node process and a test pointing the environment
at a loopback hub both work. Every request has huggingface_hub's bounded timeouts
(``HF_HUB_ETAG_TIMEOUT`` for metadata, ``HF_HUB_DOWNLOAD_TIMEOUT`` per read of data) and no retry:
callers choose another source. All calls block; run them with ``asyncio.to_thread``. Every
failure is a ``ModelMetadataError`` whose message names the model, the file and the endpoint.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx2
from huggingface_hub import HfApi, constants, get_token, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    OIDCError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from reconciler.models.catalog import ModelNotFound
from reconciler.models.metadata import InvalidModelConfig, ModelMetadataError
from reconciler.models.model_info import (
    MAX_SIDE_FILE_BYTES,
    SIDE_FILE_PATTERNS,
    ModelInfoSpec,
    SideFile,
    TensorEntry,
    WeightFile,
)

INDEX_FILE = "model.safetensors.index.json"
HEADER_PROBE_BYTES = 64 << 10  # one range read covers most headers; a longer one takes a second read
MAX_HEADER_BYTES = 100 << 20
HEADER_READERS = 8  # header reads in flight for a model of many files
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class HubError(ModelMetadataError):
    """The hub answered something that cannot be used (a short read, a malformed response)."""

    reason = "HubError"


class ModelAccessDenied(HubError):
    """The hub refused the repository (401/403): private or gated, and no token that may read it."""

    reason = "ModelAccessDenied"


class HubUnreachable(HubError):
    """The hub cannot be reached (connection refused, timeout, offline mode) or is failing (5xx)."""

    reason = "HubUnreachable"


def hub_endpoint() -> str:
    """The hub's base URL: ``HF_ENDPOINT`` now, else what huggingface_hub read at import."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_usable() -> bool:
    """False when offline mode is on (``HF_HUB_OFFLINE``, or huggingface_hub's own switch)."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return not (constants.is_offline_mode() or any(_truthy(flag) for flag in flags))


def hub_model_info(repo: str, *, revision: str | None = None) -> ModelInfoSpec:
    """The ModelInfo of ``hf://{repo}`` at ``revision`` (default: the hub's main), origin "hub":
    config, every weight file's header (``headerLength``, tensors with their byte ranges, the
    file's LFS sha256), the side files, and the commit the revision resolved to."""
    hub = _Hub(repo)
    with hub.translated(revision=revision):
        info = HfApi(endpoint=hub.endpoint).model_info(repo, revision=revision, files_metadata=True,
                                                      token=hub.token or False, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    commit = info.sha if isinstance(info.sha, str) and info.sha else None
    ref = commit or revision or constants.DEFAULT_REVISION
    sizes, digests = _listing(hub, info.siblings or [])
    if "config.json" not in sizes:
        raise InvalidModelConfig(f"{hub.source}: config.json: not found on the Hugging Face hub at {hub.endpoint}")
    config_bytes = hub.get("config.json", revision=ref)
    config = _json_object(config_bytes, where=f"{hub.source}: config.json", error=InvalidModelConfig)
    names = _weight_file_names(hub, sizes, revision=ref)
    with ThreadPoolExecutor(max_workers=min(HEADER_READERS, len(names)), thread_name_prefix="hub-header") as pool:
        files = list(pool.map(lambda name: _weight_file(hub, name, revision=ref, size=sizes[name],
                                                        sha256=digests.get(name)), names))
    digests["config.json"] = hashlib.sha256(config_bytes).hexdigest()
    side = [SideFile(name=name, size=size, sha256=digests.get(name)) for name, size in sorted(sizes.items())
            if name != INDEX_FILE and size <= MAX_SIDE_FILE_BYTES
            and any(fnmatch.fnmatchcase(name, pattern) for pattern in SIDE_FILE_PATTERNS)]
    return ModelInfoSpec(source=hub.source, revision=revision, commit=commit, origin="hub", config=config,
                         weightFiles=files, sideFiles=side)


class HubReader:
    """Bytes of a model's files off the hub, for what no peer has. Blocking and thread-safe (one
    shared huggingface_hub client); ``revision`` is best the ModelInfo's commit."""

    def read_range(self, repo: str, *, revision: str | None, file: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``file`` from absolute offset ``start`` (an HTTP Range request)."""
        if start < 0 or length < 0:
            raise ValueError(f"read_range of {file}: start {start} and length {length} must not be negative")
        if length == 0:
            return b""
        return _Hub(repo).get(file, revision=revision or constants.DEFAULT_REVISION, start=start, length=length)

    def read_file(self, repo: str, *, revision: str | None, file: str) -> bytes:
        """The whole of a small file (config, tokenizer, template)."""
        return _Hub(repo).get(file, revision=revision or constants.DEFAULT_REVISION)


# --- requests ----------------------------------------------------------------------------------

class _Hub:
    """One repository on the endpoint and token of this moment."""

    def __init__(self, repo: str) -> None:
        self.repo, self.source, self.endpoint = repo, f"hf://{repo}", hub_endpoint()
        if not hub_usable():
            raise HubUnreachable(f"model {self.source!r}: the Hugging Face hub at {self.endpoint} is not used: "
                                 "HF_HUB_OFFLINE is set on this node")
        with self.translated(revision=None):
            self.token: str | None = get_token()

    def get(self, file: str, *, revision: str, start: int | None = None, length: int | None = None) -> bytes:
        """The file's bytes [start, start + length), or the whole of a small file; streamed, so a
        server that ignores the Range never makes more than ``length`` bytes arrive here."""
        ranged = start is not None and length is not None
        limit = length if ranged else MAX_SIDE_FILE_BYTES + 1  # one more: a file too big shows
        where = f"model {self.source!r}: {file} from the Hugging Face hub at {self.endpoint}"
        body = bytearray()
        with self.translated(revision=revision, file=file):
            headers = build_hf_headers(token=self.token or False)
            headers["Accept-Encoding"] = "identity"  # the bytes as stored: sizes and offsets must hold
            if ranged:
                headers["Range"] = f"bytes={start}-{start + length - 1}"
            url = hf_hub_url(self.repo, file, revision=revision, endpoint=self.endpoint)
            with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                hf_raise_for_status(response)
                if ranged:
                    _check_range(response, start=start, length=length, where=where)
                elif response.status_code != 200:
                    raise HubError(f"{where}: answered HTTP {response.status_code} to a plain GET")
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) >= limit:
                        break
        if ranged and len(body) < length:
            raise HubError(f"{where}: short read: asked for {length} bytes at offset {start}, got {len(body)}")
        if not ranged and len(body) >= limit:
            raise HubError(f"{where}: larger than {MAX_SIDE_FILE_BYTES} bytes: not a small file (read it by ranges)")
        return bytes(body[:limit]) if ranged else bytes(body)

    @contextmanager
    def translated(self, *, revision: str | None, file: str | None = None) -> Iterator[None]:
        """huggingface_hub's and httpx's exceptions as this module's, naming model, file and endpoint."""
        what = f"model {self.source!r}" + (f": {file}" if file else "")
        at = f"the Hugging Face hub at {self.endpoint}"
        try:
            yield
        except ModelMetadataError:
            raise
        except RevisionNotFoundError:
            raise ModelNotFound(f"{what}: revision {revision!r} not found on {at}") from None
        except RemoteEntryNotFoundError:
            ref = revision or constants.DEFAULT_REVISION
            raise ModelNotFound(f"{what}: not found on {at} (revision {ref!r})") from None
        except GatedRepoError as error:
            raise self._denied(error, what=what, at=at, kind="gated") from None
        except RepositoryNotFoundError as error:
            if _status(error) in (401, 403):
                raise self._denied(error, what=what, at=at, kind="private or gated, or does not exist") from None
            raise ModelNotFound(f"model {self.source!r}: not found on {at}") from None
        except HfHubHTTPError as error:
            status = _status(error)
            if status in (401, 403):
                raise self._denied(error, what=what, at=at, kind="private or gated") from None
            if status is not None and (status >= 500 or status in (408, 429)):
                raise HubUnreachable(f"{what}: {at} is failing: HTTP {status}") from None
            raise HubError(f"{what}: {at} answered HTTP {status}: {_first_line(error)}") from None
        except OIDCError as error:
            raise ModelAccessDenied(f"{what}: no token for {at}: the OIDC token exchange failed: {error}") from None
        except OfflineModeIsEnabled:
            raise HubUnreachable(f"{what}: {at} is not used: huggingface_hub's offline mode is on") from None
        except httpx2.HTTPError as error:
            raise HubUnreachable(f"{what}: cannot reach {at}: {type(error).__name__}: {error}") from None
        except HFValidationError as error:
            raise ModelNotFound(f"model {self.source!r}: not a valid Hugging Face repository id: {error}") from None
        except (ValueError, KeyError, TypeError) as error:  # a response that is not the hub's JSON
            raise HubError(f"{what}: {at} gave an answer that cannot be read: {error}") from None

    def _denied(self, error: HfHubHTTPError, *, what: str, at: str, kind: str) -> ModelAccessDenied:
        sent = "a token was sent but it may not read this repository" if self.token else "no token was sent"
        return ModelAccessDenied(f"{what}: {at} refused access (HTTP {_status(error)}): the repository is {kind}; "
                                 f"set HF_TOKEN on the node to a token that may read it ({sent})")


# --- the parts of a ModelInfo ------------------------------------------------------------------

def _listing(hub: _Hub, siblings: list[Any]) -> tuple[dict[str, int], dict[str, str]]:
    """Top-level files (as a local directory's globs see them): name → size, name → LFS sha256."""
    sizes: dict[str, int] = {}
    digests: dict[str, str] = {}
    for sibling in siblings:
        name = sibling.rfilename
        if "/" in name:
            continue
        lfs = sibling.lfs
        size = sibling.size if sibling.size is not None else (lfs.size if lfs is not None else None)
        if size is None:
            raise HubError(f"{hub.source}: {name}: the file list of the Hugging Face hub at {hub.endpoint} "
                           "gives no size (a hub that ignores blobs=True?)")
        sizes[name] = int(size)
        if lfs is not None and lfs.sha256:
            digests[name] = str(lfs.sha256)
    return sizes, digests


def _weight_file_names(hub: _Hub, sizes: dict[str, int], *, revision: str) -> list[str]:
    """The files named by model.safetensors.index.json, else model*.safetensors, else *.safetensors
    (as ``reconciler.models.metadata.safetensors_files`` picks them on disk)."""
    if INDEX_FILE in sizes:
        where = f"{hub.source}: {INDEX_FILE}"
        index = _json_object(hub.get(INDEX_FILE, revision=revision), where=where, error=ModelMetadataError)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelMetadataError(f"{where}: not a valid index (needs a \"weight_map\" object of tensor → file)")
        names = sorted(set(weight_map.values()))
        if missing := [name for name in names if name not in sizes]:
            raise ModelMetadataError(f"{where}: names file(s) not on the hub at {hub.endpoint}: {', '.join(missing)}")
        return names
    files = sorted(name for name in sizes if name.endswith(".safetensors"))
    names = [name for name in files if name.startswith("model")] or files
    if not names:
        raise ModelMetadataError(f"{hub.source}: no .safetensors weight files on the Hugging Face hub at {hub.endpoint}")
    return names


def _weight_file(hub: _Hub, name: str, *, revision: str, size: int, sha256: str | None) -> WeightFile:
    """A safetensors file's header, read with one or two Range requests."""
    where = f"{hub.source}: {name}"
    if size < 8:
        raise ModelMetadataError(f"{where}: {size} bytes is too short to be a safetensors file")
    prefix = hub.get(name, revision=revision, start=0, length=min(size, HEADER_PROBE_BYTES))
    length = int.from_bytes(prefix[:8], "little")
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise ModelMetadataError(f"{where}: header length {length} is not plausible for a file of {size} bytes; "
                                 "not a safetensors file?")
    raw = prefix[8:8 + length]
    if len(raw) < length:
        raw += hub.get(name, revision=revision, start=len(prefix), length=8 + length - len(prefix))
    header = _json_object(raw, where=f"{where}: safetensors header", error=ModelMetadataError)
    data_bytes = size - 8 - length
    tensors: dict[str, TensorEntry] = {}
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            tensors[tensor] = TensorEntry(dtype=str(entry["dtype"]), shape=[int(x) for x in entry["shape"]],
                                          start=begin, end=end)
        except (KeyError, TypeError, ValueError):
            raise ModelMetadataError(f"{where}: tensor {tensor!r} has no valid dtype, shape and data_offsets") from None
        if not begin <= end <= data_bytes:
            raise ModelMetadataError(f"{where}: tensor {tensor!r} spans bytes {begin}-{end} of a data section "
                                     f"of {data_bytes}")
    return WeightFile(name=name, size=size, headerLength=length, sha256=sha256, tensors=tensors)


def _check_range(response: Any, *, start: int, length: int, where: str) -> None:
    """A 206 for exactly [start, start + length), or a 200 (the whole file) when reading from 0."""
    if response.status_code == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != start or int(match.group(2)) > start + length - 1:
            raise HubError(f"{where}: asked for bytes {start}-{start + length - 1}, got Content-Range "
                           f"{response.headers.get('Content-Range')!r}")
    elif not (response.status_code == 200 and start == 0):
        raise HubError(f"{where}: answered HTTP {response.status_code} to a Range request")


def _json_object(raw: bytes, *, where: str, error: type[ModelMetadataError]) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as problem:
        raise error(f"{where}: not valid JSON: {problem}") from None
    if not isinstance(value, dict):
        raise error(f"{where}: must hold a JSON object")
    return value


def _status(error: HfHubHTTPError) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")
