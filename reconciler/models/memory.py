"""What serving a stage needs beyond its weights: the KV cache for the deployment's context length
and concurrency, activations for one prefill chunk, and a runtime baseline.

KV sizes come from config fields alone (``num_key_value_heads``, ``head_dim``, multi-head latent
attention's ``kv_lora_rank`` family of fields, ``layer_types`` / ``sliding_window_pattern``),
never from the model's name. Where a config leaves a layer's window open the full context is
reserved: too much is safe, too little runs a node out of memory.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exo_ctl.api.meta import Frozen
from reconciler.inference.context import context_length as config_context_length

if TYPE_CHECKING:
    from reconciler.models.metadata import ModelProfile

MIB = 1024**2
# The context reserved when the deployment names none: the model's own, but at most this.
DEFAULT_CONTEXT_LENGTH = 4096
# mlx-lm's KVCache grows its buffers by this many positions (KVCache.step).
KV_CACHE_STEP = 256
# Per stage: its compute thread, MLX's buffer cache and the stage server's bounded buffers.
RUNTIME_BASELINE_BYTES = 128 * MIB
_SLIDING = ("sliding_attention", "sliding", "local", "chunked_attention")


def reserved_context_length(requested: int | None, model_context: int | None) -> int:
    """Tokens of KV cache reserved per request: spec.resources.contextLength, else the model's own
    context length, at most DEFAULT_CONTEXT_LENGTH."""
    return requested or min(model_context or DEFAULT_CONTEXT_LENGTH, DEFAULT_CONTEXT_LENGTH)


def serving_fields(text: dict[str, Any], *, num_layers: int, dtype_bytes: int) -> dict[str, Any]:
    """The ModelProfile fields that size a stage's KV cache and activations, from a (text) config."""
    heads = _positive(text.get("num_attention_heads")) or 0
    hidden = _positive(text.get("hidden_size")) or 0
    kv_heads = _positive(text.get("num_key_value_heads")) or heads
    head_dim = _positive(text.get("head_dim")) or (hidden // heads if heads else 0)
    if _positive(text.get("kv_lora_rank")):
        # Multi-head latent attention: mlx-lm caches either the latent or full heads depending on
        # the family's code; reserve the larger, full keys (nope + rope) and values per head.
        key_dim = (_positive(text.get("qk_nope_head_dim")) or 0) + (_positive(text.get("qk_rope_head_dim")) or 0)
        value_dim = _positive(text.get("v_head_dim")) or key_dim
        per_token = heads * (key_dim + value_dim) * dtype_bytes
    else:
        per_token = kv_heads * head_dim * 2 * dtype_bytes
    return {
        "kv_bytes_per_token": [per_token] * num_layers,
        "kv_window": sliding_windows(text, num_layers=num_layers),
        "context_length": config_context_length(text),
        "num_attention_heads": heads,
        "intermediate_size": _positive(text.get("intermediate_size")) or 0,
    }


def sliding_windows(text: dict[str, Any], *, num_layers: int) -> list[int]:
    """Per layer, the most positions its cache keeps (0: the whole context), where the config says."""
    window = _positive(text.get("sliding_window"))
    if window is None:
        return [0] * num_layers
    types = text.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        return [window if kind in _SLIDING else 0 for kind in types]
    pattern = _positive(text.get("sliding_window_pattern"))
    if pattern is not None:  # every pattern-th layer is global, the others slide (gemma3, cohere2)
        return [0 if i % pattern == pattern - 1 else window for i in range(num_layers)]
    return [0] * num_layers  # a window the config does not assign to layers: reserve it all


class ServingBudget(Frozen):
    """The serving numbers a deployment is planned for."""

    context_length: int
    max_concurrent_requests: int
    prefill_chunk: int

    def kv_cache_bytes(self, profile: "ModelProfile", start: int, end: int) -> int:
        """The KV cache of layers [start, end) for every concurrent request at full context, in
        the whole steps mlx-lm allocates (a sliding layer's buffer stops at its window)."""
        if not profile.kv_bytes_per_token:
            return 0
        allocated = -(-self.context_length // KV_CACHE_STEP) * KV_CACHE_STEP
        total = 0
        for index in range(start, end):
            window = profile.kv_window[index] if profile.kv_window else 0
            positions = min(allocated, window) if window else allocated
            total += profile.kv_bytes_per_token[index] * positions
        return total * self.max_concurrent_requests

    def activation_bytes(self, profile: "ModelProfile", *, last: bool) -> int:
        """One layer's working set for the largest step: a prefill chunk, or one token of every
        request batched; hidden states and MLP in the compute dtype, attention scores in float32,
        and the last stage's logits in float32."""
        tokens = max(self.prefill_chunk, self.max_concurrent_requests)
        width = 6 * profile.hidden_size + 4 * profile.intermediate_size  # q, k, v, o, residual, norm; MLP
        scores = profile.num_attention_heads * self.context_length * 4  # each token against the context
        size = tokens * (width * profile.activation_dtype_bytes + scores)
        return size + (tokens * profile.vocab_size * 4 if last else 0)

    def overhead_bytes(self, profile: "ModelProfile", *, last: bool) -> int:
        """What a stage holds besides its weights and KV cache."""
        return self.activation_bytes(profile, last=last) + RUNTIME_BASELINE_BYTES


def compute_scale(planned_dtype: str, *, node_dtype: str, requested: str | None) -> float:
    """Bytes a node holds per planned byte. A node whose compute dtype (Node status.compute.dtype,
    measured at start) is wider than the planned float dtype widens weights, KV cache and
    activations to it; spec.model.dtype, quantized files and other nodes scale by 1."""
    from reconciler.models.metadata import FLOAT_DTYPE_BYTES

    if requested or planned_dtype not in FLOAT_DTYPE_BYTES or node_dtype not in FLOAT_DTYPE_BYTES:
        return 1.0
    return max(1.0, FLOAT_DTYPE_BYTES[node_dtype] / FLOAT_DTYPE_BYTES[planned_dtype])


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
