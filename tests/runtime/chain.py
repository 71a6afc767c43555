"""Single-process mlx-lm greedy generation, and the same through a chain of in-process shards."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step

from reconciler.models.metadata import profile_from_directory
from reconciler.runtime import load_shard

PROMPT = [1, 17, 42, 99, 7, 250, 3, 64, 128, 11, 300, 5]  # longer than gemma3's sliding window of 8
NEW_TOKENS = 24


def reference_tokens(model: Any) -> list[int]:
    return [token for token, _ in generate_step(mx.array(PROMPT), model, max_tokens=NEW_TOKENS)]


def ranges(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Cut points for ``stages`` stages; three stages get an uneven split (the last stage one layer)."""
    if stages == 1:
        return [(0, num_layers)]
    if stages == 2:
        cuts = [0, num_layers // 2, num_layers]
    else:
        cuts = [0, 1, num_layers - 1, num_layers] if num_layers > 3 else [0, 1, 2, num_layers]
    return list(zip(cuts, cuts[1:]))


def chained_tokens(path: Path, *, stages: int, dtype: str | None = None) -> list[int]:
    """mlx-lm's schedule (prefill all but the last prompt token, then one token a step), through
    one shard per stage."""
    num_layers = profile_from_directory(path).num_layers
    shards = [load_shard(path, start=start, end=end, dtype=dtype) for start, end in ranges(num_layers, stages)]
    try:
        caches = [shard.make_cache() for shard in shards]

        def run(tokens: list[int]) -> mx.array:
            x = mx.array([tokens])
            for shard, cache in zip(shards, caches):
                x = shard.forward(x, cache=cache)
                mx.eval(x)
            return x

        run(PROMPT[:-1])
        out, token = [], PROMPT[-1]
        for _ in range(NEW_TOKENS):
            logits = run([token])[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, keepdims=True)  # as mlx-lm's sampler sees them
            token = mx.argmax(logprobs, axis=-1).item()
            out.append(token)
        return out
    finally:
        for shard in shards:
            shard.close()
