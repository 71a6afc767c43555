"""How much memory each part of a model takes, read from its files without loading any weight.

A local model in Hugging Face layout is measured from ``config.json`` plus the JSON header of each
``.safetensors`` file: the byte ranges there are the real tensor sizes, so bf16, fp16 and MLX
quantized checkpoints (uint32 packed weights + scales + biases) are all counted exactly. A model
that is not on disk is estimated from its config numbers by ``profile_from_config``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from exo_ctl.api.meta import Frozen
from reconciler.models.memory import serving_fields

FLOAT_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
QUANTIZED_DTYPE_BITS = {"4bit": 4, "8bit": 8}
DEFAULT_GROUP_SIZE = 64
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_TORCH_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "half": "float16", "float": "float32"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_NOT_LOADED = ("vision_tower.", "multi_modal_projector.")  # mlx-lm drops these from gemma3 checkpoints
_LM_HEAD = re.compile(r"(?:^|\.)lm_head\.")
_MAX_HEADER = 100 * 1024 * 1024


class ModelMetadataError(ValueError):
    """A model's files or config cannot be measured; the message names the file or field.
    ``reason`` is the condition reason the scheduler reports."""

    reason = "InvalidModelFiles"


class InvalidModelConfig(ModelMetadataError):
    """config.json is missing, unreadable, or lacks a field planning needs."""

    reason = "InvalidModelConfig"


class UnsupportedDtype(ModelMetadataError):
    """spec.model.dtype is unknown or cannot be honoured for this model."""

    reason = "UnsupportedDtype"


class ModelProfile(Frozen):
    """Bytes per part of a model: what each pipeline stage has to hold.

    Stage 0 holds the embedding; the last stage holds ``head_bytes`` (final norm + lm_head) and,
    when the embeddings are tied, the embedding matrix too (it doubles as the output projection).
    """

    name: str = ""
    num_layers: int = Field(ge=1)
    layer_bytes: list[int]
    embedding_bytes: int = Field(ge=0)
    head_bytes: int = Field(ge=0, description="final norm + lm_head; no lm_head when tied")
    lm_head_bytes: int = Field(default=0, ge=0, description="the untied lm_head alone (part of head_bytes)")
    total_bytes: int = Field(ge=0)
    dtype: str
    hidden_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    tie_word_embeddings: bool = False
    quantization_bits: int | None = None
    quantization_group_size: int | None = None
    # What serving adds to the weights (see reconciler.models.memory); empty lists: not known.
    kv_bytes_per_token: list[int] = Field(default_factory=list, description="per layer: K+V bytes one token adds")
    kv_window: list[int] = Field(default_factory=list, description="per layer: most positions kept (0: all)")
    context_length: int | None = Field(default=None, ge=1, description="the config's max_position_embeddings")
    num_attention_heads: int = Field(default=0, ge=0)
    intermediate_size: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelProfile":
        if len(self.layer_bytes) != self.num_layers:
            raise ValueError(f"layer_bytes has {len(self.layer_bytes)} entries for {self.num_layers} layers")
        for name in ("kv_bytes_per_token", "kv_window"):
            if (entries := len(getattr(self, name))) not in (0, self.num_layers):
                raise ValueError(f"{name} has {entries} entries for {self.num_layers} layers")
        return self

    @property
    def activation_dtype_bytes(self) -> int:
        """Bytes per activation (and per KV entry): quantized weights compute in 16-bit floats."""
        return FLOAT_DTYPE_BYTES.get(self.dtype, 2)

    def stage_bytes(self, start: int, end: int, *, first: bool, last: bool) -> int:
        """Memory of a stage holding layers [start, end), plus embedding/head when first/last."""
        size = sum(self.layer_bytes[start:end])
        if first:
            size += self.embedding_bytes
        if last:
            size += self.head_bytes
            if self.tie_word_embeddings and not first:
                size += self.embedding_bytes
        return size


# --- from files --------------------------------------------------------------------------------

def profile_from_directory(path: Path, *, name: str | None = None) -> ModelProfile:
    """Measure a local model directory (config.json + safetensors headers); no weight is read."""
    path = Path(path)
    config = read_config(path)
    headers = [(str(file), read_safetensors_header(file)) for file in safetensors_files(path)]
    return profile_from_headers(config, headers, name=name or path.name, where=path)


def tensor_part(tensor: str, *, num_layers: int) -> str | int | None:
    """Which part of a model a checkpoint tensor belongs to: its layer index, "embedding", "lm_head",
    "head" (final norm and anything else outside the layer stack), or None for tensors mlx-lm does
    not load. Raises ValueError for a layer index beyond ``num_layers``."""
    if tensor == "__metadata__" or tensor.startswith(_NOT_LOADED):
        return None
    if match := _LAYER.search(tensor):
        index = int(match.group(1))
        if index >= num_layers:
            raise ValueError(f"tensor {tensor!r} is in layer {index}, but config.json says num_hidden_layers={num_layers}")
        return index
    if "embed_tokens" in tensor:
        return "embedding"
    if _LM_HEAD.search(tensor):
        return "lm_head"
    return "head"


def is_tied(config: dict[str, Any], *, has_lm_head: bool) -> bool:
    """Tied the way mlx-lm decides: the config's flag where it has one, else no lm_head in the files
    (gemma3's configs carry no flag). A tied model's lm_head in the files is dropped at load."""
    text = _text_config(config)
    flag = text.get("tie_word_embeddings", config.get("tie_word_embeddings"))
    return bool(flag) if flag is not None else not has_lm_head


def num_layers_of(config: dict[str, Any], *, where: object = "config.json") -> int:
    return _int_field(_text_config(config), "num_hidden_layers", where)


def profile_from_headers(config: dict[str, Any], headers: list[tuple[str, dict[str, Any]]], *, name: str,
                         where: object = "config.json") -> ModelProfile:
    """A model's profile from its config and the JSON headers of its safetensors files, given as
    (file label, header) pairs: from a local directory, or read off a hub (see ``model_info``)."""
    text = _text_config(config)
    num_layers = num_layers_of(config, where=where)
    layer_bytes = [0] * num_layers
    embedding = head = lm_head = 0
    float_bytes: dict[str, int] = {}
    for file, header in headers:
        for tensor, info in header.items():
            try:
                part = tensor_part(tensor, num_layers=num_layers)
            except ValueError as error:
                raise ModelMetadataError(f"{file}: {error}") from None
            if part is None:
                continue
            try:
                begin, end = info["data_offsets"]
                size = int(end) - int(begin)
            except (KeyError, TypeError, ValueError):
                raise ModelMetadataError(f"{file}: tensor {tensor!r} has no valid data_offsets") from None
            if (dtype := _SAFETENSORS_DTYPES.get(info.get("dtype", ""))) is not None:
                float_bytes[dtype] = float_bytes.get(dtype, 0) + size
            if isinstance(part, int):
                layer_bytes[part] += size
            elif part == "embedding":
                embedding += size
            elif part == "lm_head":
                lm_head += size
            else:
                head += size
    if missing := [i for i, size in enumerate(layer_bytes) if size == 0]:
        raise ModelMetadataError(f"{where}: no weights found for layer(s) {_ranges(missing)} of {num_layers}")
    tied = is_tied(config, has_lm_head=lm_head > 0)
    head += 0 if tied else lm_head
    quantization = config.get("quantization") or config.get("quantization_config") or {}
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    if bits:
        dtype = f"{bits}bit"
    elif float_bytes:
        dtype = max(float_bytes, key=lambda d: (float_bytes[d], d))
    else:
        dtype = _TORCH_DTYPES.get(str(text.get("torch_dtype") or config.get("torch_dtype")), "bfloat16")
    return ModelProfile(
        name=name,
        num_layers=num_layers,
        layer_bytes=layer_bytes,
        embedding_bytes=embedding,
        head_bytes=head,
        lm_head_bytes=0 if tied else lm_head,
        total_bytes=sum(layer_bytes) + embedding + head,
        dtype=dtype,
        hidden_size=_int_field(text, "hidden_size", where),
        vocab_size=_int_field(text, "vocab_size", where),
        tie_word_embeddings=tied,
        quantization_bits=int(bits) if bits else None,
        quantization_group_size=int(quantization.get("group_size", DEFAULT_GROUP_SIZE)) if bits else None,
        **serving_fields(text, num_layers=num_layers, dtype_bytes=FLOAT_DTYPE_BYTES.get(dtype, 2)),
    )


def read_config(path: Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidModelConfig(f"{file}: not found (a model directory needs config.json)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidModelConfig(f"{file}: cannot read: {error}") from None
    except json.JSONDecodeError as error:
        raise InvalidModelConfig(f"{file}: line {error.lineno}: invalid JSON: {error.msg}") from None
    if not isinstance(config, dict):
        raise InvalidModelConfig(f"{file}: must hold a JSON object")
    return config


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a model: those named by model.safetensors.index.json, else model*.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelMetadataError(f"{index}: not a valid index (needs a \"weight_map\" object of tensor → file)") from None
        files = [path / name for name in names]
        if missing := [file.name for file in files if not file.exists()]:
            raise ModelMetadataError(f"{index}: names missing file(s): {', '.join(missing)}")
        return files
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelMetadataError(f"{path}: no .safetensors weight files")
    return files


def read_safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: 8-byte little-endian length, then that much JSON."""
    try:
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelMetadataError(f"{file}: too short to be a safetensors file")
            length = int.from_bytes(prefix, "little")
            if length > _MAX_HEADER:
                raise ModelMetadataError(f"{file}: header length {length} is not plausible; not a safetensors file?")
            raw = f.read(length)
    except OSError as error:
        raise ModelMetadataError(f"{file}: cannot read: {error}") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ModelMetadataError(f"{file}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelMetadataError(f"{file}: safetensors header is not a JSON object")
    return header


# --- from a config alone -----------------------------------------------------------------------

def profile_from_config(
    config: dict[str, Any],
    *,
    dtype: str = "bfloat16",
    group_size: int = DEFAULT_GROUP_SIZE,
    name: str = "",
) -> ModelProfile:
    """Estimate a decoder-only model's sizes from its config numbers.

    ``dtype`` is a float type (bfloat16, float16, float32) or an MLX quantization (4bit, 8bit):
    linear and embedding weights are then packed at ``bits`` per weight plus a float16/bfloat16
    scale and bias per ``group_size`` weights; norms and biases stay in 16-bit floats.
    A config that itself carries ``quantization`` {bits, group_size} (an MLX checkpoint) wins.
    """
    text = _text_config(config)
    where = f"config of {name}" if name else "config"
    if any(text.get(key) for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise InvalidModelConfig(f"{where}: mixture-of-experts models cannot be estimated from a config; use the model's files")
    quantization = config.get("quantization")
    if isinstance(quantization, dict) and quantization.get("bits"):
        dtype = f"{int(quantization['bits'])}bit"
        group_size = int(quantization.get("group_size", group_size))
    bits = QUANTIZED_DTYPE_BITS.get(dtype)
    if bits is None and dtype not in FLOAT_DTYPE_BYTES:
        raise UnsupportedDtype(f"dtype {dtype!r} is not one of {', '.join([*FLOAT_DTYPE_BYTES, *QUANTIZED_DTYPE_BITS])}")
    float_bytes = FLOAT_DTYPE_BYTES.get(dtype, 2)

    hidden = _int_field(text, "hidden_size", where)
    layers = _int_field(text, "num_hidden_layers", where)
    vocab = _int_field(text, "vocab_size", where)
    intermediate = _int_field(text, "intermediate_size", where)
    heads = _int_field(text, "num_attention_heads", where)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    tied = bool(text.get("tie_word_embeddings", False))
    model_type = str(text.get("model_type") or config.get("model_type") or "")
    # Architecture rules (not model names): Qwen2 always has q/k/v biases, Qwen3 has q/k norms.
    qkv_bias = bool(text.get("attention_bias", model_type == "qwen2"))
    out_bias = bool(text.get("attention_bias", False))
    mlp_bias = bool(text.get("mlp_bias", False))
    qk_norm = model_type == "qwen3"

    def matrix(rows: int, cols: int) -> int:
        if bits is None:
            return rows * cols * float_bytes
        if cols % group_size:
            raise UnsupportedDtype(f"{where}: dimension {cols} is not a multiple of group size {group_size}")
        return rows * cols * bits // 8 + 2 * rows * (cols // group_size) * 2

    def vector(size: int) -> int:
        return size * (float_bytes if bits is None else 2)

    q, kv = heads * head_dim, kv_heads * head_dim
    attention = matrix(q, hidden) + 2 * matrix(kv, hidden) + matrix(hidden, q)
    attention += vector(q + 2 * kv) if qkv_bias else 0
    attention += vector(hidden) if out_bias else 0
    attention += vector(2 * head_dim) if qk_norm else 0
    mlp = 3 * matrix(intermediate, hidden) + (vector(2 * intermediate + hidden) if mlp_bias else 0)
    layer = attention + mlp + vector(2 * hidden)
    embedding = matrix(vocab, hidden)
    lm_head = 0 if tied else matrix(vocab, hidden)
    head = vector(hidden) + lm_head
    return ModelProfile(
        name=name,
        num_layers=layers,
        layer_bytes=[layer] * layers,
        embedding_bytes=embedding,
        head_bytes=head,
        lm_head_bytes=lm_head,
        total_bytes=layer * layers + embedding + head,
        dtype=dtype,
        hidden_size=hidden,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        quantization_bits=bits,
        quantization_group_size=group_size if bits else None,
        **serving_fields(text, num_layers=layers, dtype_bytes=float_bytes),
    )


# --- helpers -----------------------------------------------------------------------------------

def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (multimodal configs nest it under text_config)."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _int_field(config: dict[str, Any], key: str, where: object) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidModelConfig(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _ranges(indices: list[int]) -> str:
    spans: list[str] = []
    start = prev = indices[0]
    for index in [*indices[1:], None]:
        if index is not None and index == prev + 1:
            prev = index
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if index is not None:
            start = prev = index
    return ", ".join(spans)
