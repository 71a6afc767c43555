"""``spec.model.dtype`` applied when a stage loads: float files are cast or quantized with mlx-lm's
own ``quantize_model`` (lazily, so each layer is converted as it is read); quantized files are
served only as what they are."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

FLOAT_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
QUANTIZED_BITS = {"4bit": 4, "8bit": 8}
GROUP_SIZE = 64  # mlx-lm's default, and what the planner assumes


class WeightDtypeError(ValueError):
    """The files cannot be served in the dtype the deployment asks for."""


def files_dtype(config: dict[str, Any]) -> str | None:
    """``4bit`` / ``8bit`` for files mlx-lm quantized (affine), else None (float files)."""
    quantization = config.get("quantization")
    if not isinstance(quantization, dict) or not quantization.get("bits"):
        return None
    mode = quantization.get("mode", "affine")
    return f"{int(quantization['bits'])}bit" if mode == "affine" else f"{mode}"


def serving_dtype(requested: str | None, *, compute_dtype: str, config: dict[str, Any]) -> str | None:
    """The dtype a stage loads: spec.model.dtype when set, else float32 for float files on a node
    that computes fastest in float32 (widening loses nothing); otherwise the files' own dtype. The
    node's dtype never narrows weights, and quantized files are never converted behind the user's back."""
    if requested or compute_dtype != "float32" or files_dtype(config) is not None:
        return requested
    return compute_dtype


def apply_dtype(model: nn.Module, config: dict[str, Any], *, dtype: str | None, model_path: Path) -> dict[str, Any]:
    """Make the (still lazy) ``model`` hold ``dtype``; returns the config that now describes it."""
    if dtype is None:
        return config
    if dtype not in FLOAT_DTYPES and dtype not in QUANTIZED_BITS:
        raise WeightDtypeError(f"spec.model.dtype: {dtype!r} is not one of {', '.join([*FLOAT_DTYPES, *QUANTIZED_BITS])}")
    own = files_dtype(config)
    if own is not None:
        if own == dtype:
            return config
        raise WeightDtypeError(
            f"{model_path}: spec.model.dtype {dtype} cannot be honoured: the files are quantized ({own}); "
            f"deploy them with dtype {own} or none"
        )
    if dtype in FLOAT_DTYPES:
        model.set_dtype(FLOAT_DTYPES[dtype])
        return {**config, "torch_dtype": dtype}
    from mlx_lm.utils import quantize_model

    _, quantized = quantize_model(model, dict(config), group_size=GROUP_SIZE, bits=QUANTIZED_BITS[dtype])
    return quantized
