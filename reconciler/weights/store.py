"""The node's model cache: the parts of models this node fetched for its Shards, one directory per
ModelInfo name, laid out so mlx-lm loads it unchanged.

``<root>/<model_info_name>/`` holds config.json and the side files, one safetensors file per part
(``model-layer-00012.safetensors``, ``model-embedding.safetensors``, ``model-lm_head.safetensors``,
``model-head.safetensors``: original tensor names, dtypes and shapes, bytes copied verbatim), and
``exo-cache.json`` (source, revision, parts held, side files, last used). Every file is written to
a temporary name and renamed into place, and a part is listed in ``exo-cache.json`` only once its
file is complete, so a crash leaves either the whole part or none of it. All methods block (disk
I/O): call them off the event loop.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from exo_ctl.api.resources import CachedModel
from reconciler.models.metadata import ModelMetadataError, read_safetensors_header
from reconciler.models.model_info import ModelInfoSpec, Part, TensorEntry, model_info_name

MANIFEST = "exo-cache.json"
INDEX_FILE = "model.safetensors.index.json"  # names the original files: never in a cache directory
_TMP_PREFIX = ".exo-tmp-"


class CacheError(Exception):
    """A part or file that cannot be written as asked (names the model, part and tensor)."""


def part_file_name(part: Part) -> str:
    """The safetensors file of ``part`` in a cache directory (matches mlx-lm's ``model*.safetensors``)."""
    if isinstance(part, int):
        return f"model-layer-{part:05d}.safetensors"
    if part not in ("embedding", "lm_head", "head"):
        raise ValueError(f"unknown part {part!r}: a layer index, embedding, lm_head or head")
    return f"model-{part}.safetensors"


def format_parts(parts: set[Part] | list[Part]) -> list[str]:
    """Parts as CachedModel lists them: contiguous layers as inclusive ranges ("0-5", "7"), then
    embedding, lm_head, head."""
    layers = sorted(p for p in parts if isinstance(p, int))
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    ranges = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return ranges + [p for p in ("embedding", "lm_head", "head") if p in parts]


def parse_parts(listed: list[str]) -> set[Part]:
    """The inverse of ``format_parts``; entries it does not know are ignored (a newer node's)."""
    parts: set[Part] = set()
    for entry in listed:
        if entry in ("embedding", "lm_head", "head"):
            parts.add(entry)
            continue
        first, _, last = entry.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            parts.update(range(int(first), int(last or first) + 1))
    return parts


def safetensors_bytes(entries: dict[str, TensorEntry], tensors: dict[str, bytes]) -> tuple[bytes, list[bytes]]:
    """A safetensors file of ``tensors`` (the header, then each tensor's bytes in name order):
    original names, dtypes and shapes, new data offsets, header padded to 8 bytes."""
    header: dict[str, Any] = {}
    offset = 0
    ordered = sorted(tensors)
    for name in ordered:
        size = len(tensors[name])
        entry = entries[name]
        header[name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, [tensors[name] for name in ordered]


def is_partial_copy(path: Path) -> bool:
    """Whether ``path`` is a cache directory (parts of a model), not an original copy."""
    return (Path(path) / MANIFEST).is_file()


def _rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _atomic_write(path: Path, chunks: list[bytes]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelCache:
    """The node's model cache directory (see the module docstring for its layout)."""

    def __init__(self, root: Path, *, limit_bytes: int | None = None, clock: Callable[[], float] = time.time) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"limit_bytes: must be at least 0, got {limit_bytes}")
        self.root = Path(root)
        self.limit_bytes = limit_bytes
        self._clock = clock
        self._lock = threading.Lock()  # manifest read-modify-write
        self._index: dict[str, tuple[int, dict[str, tuple[Path, int, int]]]] = {}  # name -> (mtime, tensor -> range)

    def directory(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"model cache: {name!r} is not a ModelInfo name")
        return self.root / name

    # -- manifest --------------------------------------------------------------------------

    def _manifest(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.directory(name) / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _update(self, info: ModelInfoSpec | None, name: str, change: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            directory = self.directory(name)
            manifest = self._manifest(name)
            if manifest is None:
                if info is None:
                    return
                directory.mkdir(parents=True, exist_ok=True)
                manifest = {"source": info.source, "revision": info.revision, "parts": [], "sideFiles": [],
                            "lastUsed": _rfc3339(self._clock())}
            change(manifest)
            _atomic_write(directory / MANIFEST, [json.dumps(manifest, indent=1, sort_keys=True).encode()])

    # -- writing ---------------------------------------------------------------------------

    def parts_held(self, info: ModelInfoSpec) -> set[Part]:
        """Parts of ``info`` whose file is complete in the cache."""
        name = model_info_name(info.source, info.revision)
        manifest = self._manifest(name)
        if manifest is None:
            return set()
        listed = parse_parts([str(p) for p in manifest.get("parts", [])])
        return {p for p in listed if (self.directory(name) / part_file_name(p)).is_file()}

    def write_part(self, info: ModelInfoSpec, part: Part, tensors: dict[str, bytes]) -> None:
        """Write ``part``'s file from its tensors' bytes (each checked against its size in ``info``)."""
        name = model_info_name(info.source, info.revision)
        entries = {t: e for file in info.weightFiles for t, e in file.tensors.items() if t in tensors}
        for tensor, data in tensors.items():
            entry = entries.get(tensor)
            if entry is None:
                raise CacheError(f"model cache {name}: part {part}: {tensor!r} is not a tensor of {info.source}")
            if len(data) != entry.size:
                raise CacheError(f"model cache {name}: part {part}: {tensor!r} has {len(data)} bytes, "
                                 f"its header says {entry.size}")
        head, bodies = safetensors_bytes(entries, tensors)
        directory = self.directory(name)
        self._update(info, name, lambda m: None)  # the directory and its manifest exist first
        _atomic_write(directory / part_file_name(part), [head, *bodies])

        def add(manifest: dict[str, Any]) -> None:
            held = parse_parts([str(p) for p in manifest.get("parts", [])]) | {part}
            manifest["parts"] = format_parts(held)
        self._update(info, name, add)

    def write_side_file(self, info: ModelInfoSpec, name: str, data: bytes) -> None:
        if not name or "/" in name or "\\" in name or name.startswith(".") or name in (MANIFEST, INDEX_FILE):
            raise CacheError(f"model cache: side file name {name!r} is not a plain file name")
        model = model_info_name(info.source, info.revision)
        self._update(info, model, lambda m: None)
        _atomic_write(self.directory(model) / name, [data])

        def add(manifest: dict[str, Any]) -> None:
            manifest["sideFiles"] = sorted(set(manifest.get("sideFiles", [])) | {name})
        self._update(info, model, add)

    def touch(self, name: str) -> None:
        """Mark ``name`` as used now (a Shard loaded from it): the last model LRU evicts."""
        moment = _rfc3339(self._clock())
        self._update(None, name, lambda m: m.__setitem__("lastUsed", moment))

    # -- reading ---------------------------------------------------------------------------

    def _tensor_index(self, name: str) -> dict[str, tuple[Path, int, int]]:
        """tensor -> (file, absolute offset, size) over the parts held, re-read when the manifest changes."""
        directory = self.directory(name)
        try:
            stamp = (directory / MANIFEST).stat().st_mtime_ns
        except OSError:
            return {}
        cached = self._index.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        manifest = self._manifest(name) or {}
        index: dict[str, tuple[Path, int, int]] = {}
        for part in parse_parts([str(p) for p in manifest.get("parts", [])]):
            file = directory / part_file_name(part)
            try:
                header = read_safetensors_header(file)
                with open(file, "rb") as handle:
                    base = 8 + int.from_bytes(handle.read(8), "little")
                for tensor, entry in header.items():
                    if tensor != "__metadata__":
                        begin, end = (int(x) for x in entry["data_offsets"])
                        index[tensor] = (file, base + begin, end - begin)
            except (OSError, ModelMetadataError, KeyError, TypeError, ValueError):
                continue  # not a part file this cache wrote: served from nowhere
        self._index[name] = (stamp, index)
        return index

    def read_tensor(self, name: str, tensor: str, *, offset: int, length: int) -> bytes | None:
        """``length`` bytes of ``tensor`` from ``offset`` in it, or None when the cache does not hold
        it. A range beyond the tensor's end raises CacheError."""
        found = self._tensor_index(name).get(tensor)
        if found is None:
            return None
        file, base, size = found
        if offset < 0 or length < 0 or offset + length > size:
            raise CacheError(f"model cache {name}: {tensor!r} has {size} bytes; "
                             f"[{offset}, {offset + length}) is outside it")
        try:
            with open(file, "rb") as handle:
                handle.seek(base + offset)
                data = handle.read(length)
        except FileNotFoundError:  # evicted meanwhile
            return None
        return data if len(data) == length else None

    def read_side_file(self, name: str, file: str, *, offset: int, length: int) -> bytes | None:
        """A range of a side file the cache holds for ``name``, or None."""
        manifest = self._manifest(name)
        if manifest is None or file not in manifest.get("sideFiles", []):
            return None
        try:
            with open(self.directory(name) / file, "rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        except FileNotFoundError:
            return None
        return data if len(data) == length else None

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_partial_copy(p))

    def bytes_of(self, name: str) -> int:
        directory = self.directory(name)
        return sum(f.stat().st_size for f in directory.iterdir() if f.is_file()) if directory.is_dir() else 0

    def cached(self) -> list[dict[str, Any]]:
        """Every cache entry as a CachedModel dict (partial copies: complete is False)."""
        models = []
        for name in self.names():
            manifest = self._manifest(name)
            if manifest is None:
                continue
            held = parse_parts([str(p) for p in manifest.get("parts", [])])
            models.append(CachedModel(
                name=name, source=str(manifest.get("source", "")), revision=manifest.get("revision"),
                bytes=self.bytes_of(name), complete=False, parts=format_parts(held),
                lastUsed=manifest.get("lastUsed")).model_dump())
        return models

    def total_bytes(self) -> int:
        return sum(self.bytes_of(name) for name in self.names())

    def evict(self, *, needed: set[str]) -> list[str]:
        """Remove least recently used models (never one in ``needed``) until the cache is within its
        limit; returns the names removed, oldest first."""
        if self.limit_bytes is None:
            return []
        entries = [(m.get("lastUsed") or "", m["name"], m["bytes"]) for m in self.cached()]
        total = sum(size for _, _, size in entries)
        evicted: list[str] = []
        for _, name, size in sorted(entries):
            if total <= self.limit_bytes:
                break
            if name in needed:
                continue
            shutil.rmtree(self.directory(name), ignore_errors=True)
            self._index.pop(name, None)
            total -= size
            evicted.append(name)
        return evicted
