"""A model's context length from its config.json, whatever the family calls it, and as both
backends' handles report it."""
from __future__ import annotations

import json

import pytest

from reconciler.inference.context import context_length, read_context_length


@pytest.mark.parametrize(("config", "length"), [
    ({"model_type": "llama", "max_position_embeddings": 131072}, 131072),
    ({"model_type": "gpt2", "n_positions": 1024, "n_ctx": 1024}, 1024),
    ({"model_type": "gemma3", "text_config": {"max_position_embeddings": 32768}, "vision_config": {}}, 32768),
    ({"model_type": "chatglm", "seq_length": 8192}, 8192),
    ({"model_type": "mystery"}, None),
    ({"max_position_embeddings": True}, None),
    ({"max_position_embeddings": -1}, None),
])
def test_the_context_length_is_read_under_each_familys_name(config, length):
    assert context_length(config) == length


def test_a_missing_or_broken_config_has_no_context_length(tmp_path):
    assert read_context_length(tmp_path) is None
    (tmp_path / "config.json").write_text("{not json")
    assert read_context_length(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    assert read_context_length(tmp_path) == 4096


def test_the_local_backend_reports_the_tiny_models_context_length(backend):
    assert backend.resolve("tiny").context_length == 2048


def test_the_cluster_backend_loads_the_context_length_with_the_tokenizer(tiny_model_dir):
    from reconciler.inference.cluster import _load_tokenizer

    tokenizer, length = _load_tokenizer(str(tiny_model_dir), None)
    assert length == 2048 and tokenizer.eos_token_ids
