"""Known model configurations, the offline fallback for planning models that are neither
recorded (ModelInfo) nor on this machine nor on a reachable hub (``exoctl apply --dry-run``);
``resolve_profile``: local path → local Hugging Face cache → catalog; ``info_profile``: a
ModelInfo's profile in the deployment's dtype."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from reconciler.models.metadata import (
    FLOAT_DTYPE_BYTES,
    QUANTIZED_DTYPE_BITS,
    ModelMetadataError,
    ModelProfile,
    UnsupportedDtype,
    profile_from_config,
    profile_from_directory,
    read_config,
)
from reconciler.models.model_info import ModelInfoSpec, profile_from_info

# Config numbers as published in each model's config.json.
_LLAMA_3_2_1B = {
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "tie_word_embeddings": True,
}
_LLAMA_3_2_3B = {
    "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
    "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "tie_word_embeddings": True,
}
_LLAMA_3_1_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "tie_word_embeddings": False,
}
_LLAMA_3_70B = {
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "tie_word_embeddings": False,
}
_QWEN2_5_0_5B = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
}
_QWEN2_5_7B = {
    "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
}
_QWEN2_5_72B = {
    "model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False,
}
_QWEN3_8B = {
    "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "tie_word_embeddings": False,
}


def _family(config: dict[str, Any], bf16: list[str], q4: list[str], q8: list[str] = ()) -> dict[str, tuple[dict, str]]:
    return {
        **{repo: (config, "bfloat16") for repo in bf16},
        **{repo: (config, "4bit") for repo in q4},
        **{repo: (config, "8bit") for repo in q8},
    }


# hf repo id → (config numbers, dtype of that repo's weights)
CATALOG: dict[str, tuple[dict[str, Any], str]] = {
    **_family(_LLAMA_3_2_1B,
              ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct", "mlx-community/Llama-3.2-1B-Instruct-bf16"],
              ["mlx-community/Llama-3.2-1B-Instruct-4bit"], ["mlx-community/Llama-3.2-1B-Instruct-8bit"]),
    **_family(_LLAMA_3_2_3B,
              ["meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct", "mlx-community/Llama-3.2-3B-Instruct-bf16"],
              ["mlx-community/Llama-3.2-3B-Instruct-4bit"], ["mlx-community/Llama-3.2-3B-Instruct-8bit"]),
    **_family(_LLAMA_3_1_8B,
              ["meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "mlx-community/Meta-Llama-3.1-8B-Instruct-bf16"],
              ["mlx-community/Meta-Llama-3.1-8B-Instruct-4bit", "mlx-community/Llama-3.1-8B-Instruct-4bit"],
              ["mlx-community/Meta-Llama-3.1-8B-Instruct-8bit"]),
    **_family(_LLAMA_3_70B,
              ["meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.3-70B-Instruct",
               "mlx-community/Llama-3.3-70B-Instruct-bf16"],
              ["mlx-community/Llama-3.3-70B-Instruct-4bit", "mlx-community/Meta-Llama-3.1-70B-Instruct-4bit"],
              ["mlx-community/Llama-3.3-70B-Instruct-8bit"]),
    **_family(_QWEN2_5_0_5B, ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"], ["mlx-community/Qwen2.5-0.5B-Instruct-4bit"]),
    **_family(_QWEN2_5_7B, ["Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"], ["mlx-community/Qwen2.5-7B-Instruct-4bit"],
              ["mlx-community/Qwen2.5-7B-Instruct-8bit"]),
    **_family(_QWEN2_5_72B, ["Qwen/Qwen2.5-72B", "Qwen/Qwen2.5-72B-Instruct"], ["mlx-community/Qwen2.5-72B-Instruct-4bit"],
              ["mlx-community/Qwen2.5-72B-Instruct-8bit"]),
    **_family(_QWEN3_8B, ["Qwen/Qwen3-8B"], ["mlx-community/Qwen3-8B-4bit"], ["mlx-community/Qwen3-8B-8bit"]),
}
_CATALOG_LOWER = {repo.lower(): repo for repo in CATALOG}


class ModelNotFound(ModelMetadataError):
    """The source is neither a local model, nor in the local Hugging Face cache, nor in the catalog."""

    reason = "ModelNotFound"


def catalog_profile(repo: str, *, dtype: str | None = None) -> ModelProfile | None:
    """The estimated profile of a catalog model (``org/name``), in its own dtype unless ``dtype``."""
    key = _CATALOG_LOWER.get(repo.lower())
    if key is None:
        return None
    config, own_dtype = CATALOG[key]
    return profile_from_config(config, dtype=dtype or own_dtype, name=key)


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if hub := os.environ.get("HF_HUB_CACHE"):
        return Path(hub)
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def hf_cache_snapshot(repo: str, *, revision: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """The local snapshot directory of ``org/name`` in the Hugging Face cache, if it has a config.json."""
    root = Path(cache_dir or hf_cache_dir()) / ("models--" + repo.replace("/", "--"))
    ref = revision or "main"
    commit = ref
    ref_file = root / "refs" / ref
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
    snapshot = root / "snapshots" / commit
    if (snapshot / "config.json").is_file():
        return snapshot
    if revision is None and (snapshots := sorted((root / "snapshots").glob("*/config.json"))):
        return snapshots[0].parent
    return None


def resolve_profile(
    source: str,
    *,
    dtype: str | None = None,
    revision: str | None = None,
    hf_cache: Path | None = None,
) -> ModelProfile:
    """The profile of a ModelDeployment's ``spec.model``: a local path, else the local Hugging Face
    cache, else the catalog. ``dtype`` (spec.model.dtype) different from the files' own dtype gives
    the estimate for that dtype, computed from the model's config."""
    _check_dtype(dtype)
    if not source.startswith("hf://"):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ModelNotFound(f"model {source!r}: no such local directory (use hf://ORG/NAME for a Hugging Face model)")
        return _from_directory(path, dtype=dtype, name=source)
    repo = source[len("hf://"):]
    snapshot = hf_cache_snapshot(repo, revision=revision, cache_dir=hf_cache)
    if snapshot is not None:
        return _from_directory(snapshot, dtype=dtype, name=repo)
    profile = catalog_profile(repo, dtype=dtype)
    if profile is None:
        raise ModelNotFound(
            f"model {source!r} is not in the local Hugging Face cache ({hf_cache or hf_cache_dir()}) "
            f"and not in the catalog of known models; download it first or give a local path"
        )
    return profile


def local_model_dir(source: str, *, revision: str | None = None, hf_cache: Path | None = None) -> Path | None:
    """The directory on this machine that holds ``source`` (a local path or a cached hf:// model), if any."""
    if not source.startswith("hf://"):
        path = Path(source).expanduser()
        return path if path.is_dir() else None
    return hf_cache_snapshot(source[len("hf://"):], revision=revision, cache_dir=hf_cache)


def split_refusal_of(config: dict[str, Any], *, num_layers: int) -> str | None:
    """Why a model with this config (a ModelInfo's, or a local copy's) cannot be cut into pipeline
    stages (mlx-lm's own model classes decide), or None when it can. Blocking: imports mlx-lm."""
    from reconciler.runtime.stage_split import split_refusal

    return split_refusal(config, num_layers=num_layers)


def info_profile(info: ModelInfoSpec, *, dtype: str | None = None) -> ModelProfile:
    """The profile of a model from its ModelInfo, in ``dtype`` (spec.model.dtype) when given: what
    the scheduler plans with, the same on every leader."""
    _check_dtype(dtype)
    profile = profile_from_info(info)
    return _in_dtype(profile, info.config, dtype=dtype, name=info.source.removeprefix("hf://"))


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in FLOAT_DTYPE_BYTES and dtype not in QUANTIZED_DTYPE_BITS:
        raise UnsupportedDtype(f"dtype {dtype!r} is not one of {', '.join([*FLOAT_DTYPE_BYTES, *QUANTIZED_DTYPE_BITS])}")


def _in_dtype(profile: ModelProfile, config: dict[str, Any], *, dtype: str | None, name: str) -> ModelProfile:
    if dtype is None or dtype == profile.dtype:
        return profile
    if profile.quantization_bits:  # the loader quantizes float files, never re-quantizes or dequantizes
        raise UnsupportedDtype(
            f"spec.model.dtype: {dtype} cannot be honoured: {name} is quantized ({profile.dtype}); "
            f"deploy it with dtype {profile.dtype} or none"
        )
    return profile_from_config(config, dtype=dtype, name=name)


def _from_directory(path: Path, *, dtype: str | None, name: str) -> ModelProfile:
    return _in_dtype(profile_from_directory(path, name=name), read_config(path), dtype=dtype, name=name)
