"""Tensor parallelism through real ``exo`` processes on 127.0.0.1: a stage split over 2 ranks on 2
nodes (ring over TCP, mlx-lm's own shard()) answers greedy requests token for token like
single-process mlx-lm, and a killed rank ends the stream in flight within 5 s, after which the
group is placed again on the nodes left and serves the same answer."""
from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from harness.serving import (APPLY, DEPLOYMENTS, Reference, client_for, node_named, wait_nodes_ready,
                             wait_serving)

pytestmark = pytest.mark.slow

PROMPT = "The river runs"
MAX_TOKENS = 16


def manifest(name: str, source: Path) -> str:
    # float32: in bf16 the ranks' partial sums round once more than one process's matmul does.
    return (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\nspec:\n"
            f"  model:\n    source: {source}\n    dtype: float32\n  placement:\n    strategy: Pack\n"
            f"  parallelism:\n    tensor: 2\n")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return build_model("tiny")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    import mlx.core as mx

    reference = Reference(model_dir)
    reference.model.set_dtype(mx.float32)
    return reference


def test_two_tensor_ranks_answer_like_mlx_lm_and_a_killed_rank_fails_fast_then_the_group_moves(
        exo_cluster, model_dir, reference):
    cluster = exo_cluster(3)
    wait_nodes_ready(cluster, 3)
    entry = cluster.nodes[0]
    status, _, reply = entry.request("PATCH", f"{DEPLOYMENTS}/tp", body=manifest("tp", model_dir),
                                     content_type=APPLY, timeout=60)
    assert status in (200, 201), reply
    shards = wait_serving(entry, "tp", stages=2, timeout=150.0)
    assert {s["spec"]["tensor"]["rank"] for s in shards} == {0, 1}
    assert len({s["spec"]["nodeName"] for s in shards}) == 2

    expected = reference.greedy(reference.tokenizer.encode(PROMPT), MAX_TOKENS)
    assert len(expected) >= 8, "the reference should say something"
    text = reference.text(expected)
    answer = client_for(entry).completions.create(model="tp", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].text == text
    assert answer.usage.completion_tokens == len(expected)

    rank0 = node_named(cluster, next(s for s in shards if s["spec"]["tensor"]["rank"] == 0)["spec"]["nodeName"])
    rank1 = node_named(cluster, next(s for s in shards if s["spec"]["tensor"]["rank"] == 1)["spec"]["nodeName"])
    stream = client_for(rank0).completions.create(model="tp", prompt="Hello", max_tokens=2000, temperature=0,
                                                  stream=True)
    received, killed_at = 0, None
    with pytest.raises(openai.APIError):
        for _ in stream:
            received += 1
            if received == 5:
                rank1.kill()
                killed_at = time.monotonic()
    assert killed_at is not None and received < 2000
    assert time.monotonic() - killed_at < 5.0

    shards = wait_serving(rank0, "tp", stages=2, avoid=rank1.name, timeout=150.0)
    assert len({s["spec"]["nodeName"] for s in shards}) == 2
    again = client_for(rank0).completions.create(model="tp", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert again.choices[0].text == text
