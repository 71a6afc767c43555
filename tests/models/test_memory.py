"""What a stage reserves beyond its weights: KV cache from config fields, activations, runtime."""
import json

import mlx.core as mx
import pytest

from exo_ctl.model_builder.build_family import FAMILIES
from reconciler.models import profile_from_config
from reconciler.models.memory import RUNTIME_BASELINE_BYTES, ServingBudget, serving_fields, sliding_windows

GQA = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}


@pytest.mark.parametrize("config, dtype_bytes, per_token", [
    (GQA, 2, 8 * 128 * 2 * 2),                                                   # K and V of 8 heads of 128, bf16
    (GQA, 4, 8 * 128 * 2 * 4),                                                   # float32 caches
    ({"hidden_size": 2048, "num_attention_heads": 16}, 2, 16 * 128 * 2 * 2),      # no GQA, head_dim from hidden
    ({"hidden_size": 64, "num_attention_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
      "qk_rope_head_dim": 8, "v_head_dim": 16}, 2, 4 * (24 + 16) * 2),            # latent attention: full heads
])
def test_kv_bytes_per_token_come_from_the_configs_head_fields(config, dtype_bytes, per_token):
    fields = serving_fields(config, num_layers=3, dtype_bytes=dtype_bytes)
    assert fields["kv_bytes_per_token"] == [per_token] * 3


@pytest.mark.parametrize("config, windows", [
    ({}, [0, 0, 0, 0]),
    ({"sliding_window": 512, "sliding_window_pattern": 2}, [512, 0, 512, 0]),
    ({"sliding_window": 512, "layer_types": ["sliding_attention", "full_attention", "full_attention",
                                             "sliding_attention"]}, [512, 0, 0, 512]),
    ({"sliding_window": 4096}, [0, 0, 0, 0]),  # a window no field assigns to layers: reserve it all
])
def test_only_layers_the_config_marks_as_sliding_are_capped_at_the_window(config, windows):
    assert sliding_windows(config, num_layers=4) == windows


def test_the_kv_reservation_scales_with_context_and_concurrency_and_stops_at_the_window():
    profile = profile_from_config({**GQA, "model_type": "llama", "num_hidden_layers": 4, "vocab_size": 1000,
                                   "intermediate_size": 8192, "sliding_window": 1024, "sliding_window_pattern": 2})
    per_token = 8 * 128 * 2 * 2
    one = ServingBudget(context_length=4096, max_concurrent_requests=1, prefill_chunk=128)
    assert one.kv_cache_bytes(profile, 0, 2) == per_token * (1024 + 4096)
    four = ServingBudget(context_length=8192, max_concurrent_requests=4, prefill_chunk=128)
    assert four.kv_cache_bytes(profile, 0, 4) == 4 * per_token * 2 * (1024 + 8192)


def test_a_short_context_reserves_the_whole_step_mlx_lm_allocates():
    profile = profile_from_config({**GQA, "model_type": "llama", "num_hidden_layers": 1, "vocab_size": 1000,
                                   "intermediate_size": 8192})
    budget = ServingBudget(context_length=100, max_concurrent_requests=1, prefill_chunk=128)
    assert budget.kv_cache_bytes(profile, 0, 1) == 8 * 128 * 2 * 2 * 256


def test_the_last_stage_reserves_the_logits_of_a_prefill_chunk_and_every_stage_a_runtime_baseline():
    profile = profile_from_config({**GQA, "model_type": "llama", "num_hidden_layers": 2, "vocab_size": 128256,
                                   "intermediate_size": 14336})
    budget = ServingBudget(context_length=4096, max_concurrent_requests=4, prefill_chunk=128)
    middle, last = budget.overhead_bytes(profile, last=False), budget.overhead_bytes(profile, last=True)
    assert last - middle == 128 * 128256 * 4
    assert middle > RUNTIME_BASELINE_BYTES + 128 * 4096 * 2


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_moe", "deepseek_v3"])
def test_the_reservation_holds_what_mlx_lms_own_caches_hold_after_256_tokens(family):
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import _get_classes

    config, _, dtype = FAMILIES[family]
    model_class, args_class = _get_classes(json.loads(json.dumps(config)))
    model = model_class(args_class.from_dict(json.loads(json.dumps(config))))
    model.set_dtype(getattr(mx, dtype))
    cache = make_prompt_cache(model)
    model(mx.array([[1] * 200]), cache=cache)
    for _ in range(56):
        model(mx.array([[2]]), cache=cache)
    mx.eval([c.keys for c in cache] + [c.values for c in cache])
    held = [c.keys.nbytes + c.values.nbytes for c in cache]
    fields = serving_fields(json.loads(json.dumps(config)), num_layers=len(cache), dtype_bytes=getattr(mx, dtype).size)
    reserved = [per_token * (min(256, window) if window else 256)
                for per_token, window in zip(fields["kv_bytes_per_token"], fields["kv_window"])]
    assert all(r >= h for r, h in zip(reserved, held)), (reserved, held)
    if family != "deepseek_v3":  # its latent cache is smaller than the full heads reserved
        assert reserved == held
