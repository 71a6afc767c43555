"""What the cluster knows of a model's files, kept in the replicated state so every node plans and
fetches the same way: the config, each safetensors file's header (tensor → dtype, shape, byte
range), and the other small files (tokenizer, templates) with their sizes and digests.

A ModelInfo object is written once per (source, revision) by whichever node first reads it: the
planning node from a hub (``reconciler.models.hub``), or a node that holds the model on disk
(``info_from_directory``, which also records every tensor's sha256 so a peer's bytes can be
checked). Nothing here reads a weight file beyond its header, except to compute digests.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from exo_ctl.api.meta import API_VERSION, Frozen
from reconciler.models.metadata import (
    ModelMetadataError,
    ModelProfile,
    is_tied,
    num_layers_of,
    profile_from_headers,
    read_config,
    read_safetensors_header,
    safetensors_files,
    tensor_part,
)

MODEL_INFO_KIND = "ModelInfo"  # a store kind of its own, not served by the Kubernetes API
SIDE_FILE_PATTERNS = ("*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt", "*.py")
MAX_SIDE_FILE_BYTES = 64 << 20  # a tokenizer.json is a few MB; anything bigger is not a side file
_HASH_CHUNK = 1 << 20

Part = int | Literal["embedding", "lm_head", "head"]


class TensorEntry(Frozen):
    dtype: str
    shape: list[int]
    start: int = Field(ge=0, description="offset of its bytes in the file's data section")
    end: int = Field(ge=0)
    sha256: str | None = Field(default=None, description="of its bytes, when a node that had them computed it")

    @property
    def size(self) -> int:
        return self.end - self.start


class WeightFile(Frozen):
    name: str
    size: int = Field(ge=0)
    headerLength: int = Field(ge=0, description="bytes of JSON header: the data section starts at 8 + headerLength")
    sha256: str | None = Field(default=None, description="of the whole file (the hub's LFS oid), when known")
    tensors: dict[str, TensorEntry]

    def offset(self, tensor: str) -> int:
        """The absolute offset of ``tensor``'s first byte in this file."""
        return 8 + self.headerLength + self.tensors[tensor].start


class SideFile(Frozen):
    name: str
    size: int = Field(ge=0)
    sha256: str | None = None


class ModelInfoSpec(Frozen):
    source: str
    revision: str | None = None
    commit: str | None = Field(default=None, description="the hub commit the files are from, when known")
    origin: str = Field(description='"hub", or "node/NAME" for a node that read its own copy')
    config: dict[str, Any]
    weightFiles: list[WeightFile]
    sideFiles: list[SideFile] = Field(default_factory=list)


def model_info_name(source: str, revision: str | None) -> str:
    """The store name of the ModelInfo of (source, revision): a readable slug plus a digest."""
    slug = re.sub(r"[^a-z0-9]+", "-", source.removeprefix("hf://").lower()).strip("-")[:40].strip("-") or "model"
    digest = hashlib.sha256(f"{source}@{revision or ''}".encode()).hexdigest()[:12]
    return f"{slug}-{digest}"


def model_info_object(spec: ModelInfoSpec) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": MODEL_INFO_KIND,
            "metadata": {"name": model_info_name(spec.source, spec.revision)},
            "spec": spec.model_dump(exclude_none=True)}


def profile_from_info(spec: ModelInfoSpec) -> ModelProfile:
    headers = [(f"{spec.source}:{file.name}", {name: {"dtype": t.dtype, "shape": t.shape, "data_offsets": [t.start, t.end]}
                                              for name, t in file.tensors.items()})
               for file in spec.weightFiles]
    return profile_from_headers(spec.config, headers, name=spec.source.removeprefix("hf://"),
                                where=f"{spec.source}: config.json")


def stage_tensors(spec: ModelInfoSpec, *, start: int, end: int, first: bool, last: bool) -> dict[str, Part]:
    """The checkpoint tensors a stage holding layers [start, end) loads, each with its part: its
    layers, the embedding when first (or last with tied embeddings), the rest outside the layer
    stack when last (final norm, lm_head unless tied). Mirrors ``ModelProfile.stage_bytes``."""
    num_layers = num_layers_of(spec.config)
    parts: dict[str, Part] = {}
    for file in spec.weightFiles:
        for name in file.tensors:
            part = tensor_part(name, num_layers=num_layers)
            if part is not None:
                parts[name] = part
    tied = is_tied(spec.config, has_lm_head="lm_head" in parts.values())
    wanted: dict[str, Part] = {}
    for name, part in parts.items():
        if isinstance(part, int):
            keep = start <= part < end
        elif part == "embedding":
            keep = first or (last and tied)
        elif part == "lm_head":
            keep = last and not tied
        else:
            keep = last
        if keep:
            wanted[name] = part
    return wanted


def info_from_directory(path: Path, *, source: str, revision: str | None, origin: str,
                        digests: bool = True) -> ModelInfoSpec:
    """The ModelInfo of a model on this node's disk: headers always; each tensor's and side file's
    sha256 when ``digests`` (reads every weight byte once: blocking, call it off the event loop)."""
    path = Path(path)
    config = read_config(path)
    files: list[WeightFile] = []
    for file in safetensors_files(path):
        header = read_safetensors_header(file)
        length = int.from_bytes(file.open("rb").read(8), "little")
        tensors: dict[str, TensorEntry] = {}
        with open(file, "rb") as handle:
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                try:
                    begin, stop = (int(x) for x in entry["data_offsets"])
                    dtype, shape = str(entry["dtype"]), [int(x) for x in entry["shape"]]
                except (KeyError, TypeError, ValueError):
                    raise ModelMetadataError(f"{file}: tensor {name!r} has no valid dtype, shape and data_offsets") from None
                digest = _range_sha256(handle, 8 + length + begin, stop - begin) if digests else None
                tensors[name] = TensorEntry(dtype=dtype, shape=shape, start=begin, end=stop, sha256=digest)
        files.append(WeightFile(name=file.name, size=file.stat().st_size, headerLength=length, tensors=tensors))
    side = [SideFile(name=f.name, size=f.stat().st_size, sha256=file_sha256(f) if digests else None)
            for f in side_files(path)]
    return ModelInfoSpec(source=source, revision=revision, origin=origin, config=config, weightFiles=files,
                         sideFiles=side)


def side_files(path: Path) -> list[Path]:
    """The small files beside the weights (config, tokenizer, chat template) a node needs."""
    found = {f for pattern in SIDE_FILE_PATTERNS for f in Path(path).glob(pattern)
             if f.is_file() and f.stat().st_size <= MAX_SIDE_FILE_BYTES}
    return sorted(found - {Path(path) / "model.safetensors.index.json"})


def file_sha256(file: Path) -> str:
    with open(file, "rb") as handle:
        return _range_sha256(handle, 0, Path(file).stat().st_size)


def _range_sha256(handle: Any, offset: int, length: int) -> str:
    # One reused buffer: hashing a model's every byte must not leave the node's heap holding chunks
    # (glibc keeps freed allocations under its mmap threshold, so fresh 8 MiB reads stay resident).
    digest, buffer = hashlib.sha256(), bytearray(min(_HASH_CHUNK, length))  # a norm's few KB get a few KB
    view = memoryview(buffer)
    handle.seek(offset)
    while length > 0:
        got = handle.readinto(view[:min(len(buffer), length)])
        if not got:
            raise ModelMetadataError(f"{handle.name}: ends inside a tensor's bytes (truncated file?)")
        digest.update(view[:got])
        length -= got
    return digest.hexdigest()
