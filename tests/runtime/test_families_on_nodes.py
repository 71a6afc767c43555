"""Families that once broke (Gemma 2, Gemma 3 text and wrapped, DeepSeek V3) and a MoE, each
served Spread over three real ``exo`` nodes: the OpenAI API answers with mlx-lm's greedy text."""
from __future__ import annotations

from pathlib import Path

import time

import pytest
from mlx_lm.utils import quantize_model

from exo_ctl.model_builder.build_family import build_family_model
from harness.cluster import ExoProcess, start_cluster
from harness.serving import APPLY, DEPLOYMENTS, Reference, client_for, shards_of, wait_nodes_ready, wait_serving

pytestmark = pytest.mark.slow

FAMILIES = ["gemma2", "gemma3_text", "gemma3", "deepseek_v3", "qwen3_moe"]
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-models")
    built = {family: build_family_model(family, root / family) for family in [*FAMILIES, "llama"]}
    built["llama-4bit"] = build_family_model("llama", root / "llama-4bit", quantize_bits=4)
    return built


def apply(node: ExoProcess, name: str, source: Path, dtype: str | None = None) -> None:
    dtype_line = f"    dtype: {dtype}\n" if dtype else ""
    body = (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\nspec:\n"
            f"  model:\n    source: {source}\n{dtype_line}  placement:\n    strategy: Spread\n")
    # A node importing mlx-lm for its first shard can be slow to answer on a busy machine.
    status, _, reply = node.request("PATCH", f"{DEPLOYMENTS}/{name}", body=body, content_type=APPLY, timeout=60)
    assert status in (200, 201), reply


@pytest.fixture(scope="module")
def entry(tmp_path_factory, models):
    cluster = start_cluster(3, tmp_path_factory.mktemp("family-nodes"))
    try:
        wait_nodes_ready(cluster, 3)
        node = cluster.nodes[0]
        for family in FAMILIES:
            apply(node, family.replace("_", "-"), models[family])
        apply(node, "llama-as-4bit", models["llama"], "4bit")
        apply(node, "quantized-as-bf16", models["llama-4bit"], "bfloat16")
        for name in [*FAMILIES, "llama-as-4bit"]:
            wait_serving(node, name.replace("_", "-"), stages=3, timeout=120)
        yield node
    finally:
        cluster.close()
        print(cluster.logs())


@pytest.mark.parametrize("family", FAMILIES)
def test_three_stages_on_three_nodes_answer_with_mlx_lms_greedy_text(entry, models, family):
    reference = Reference(models[family])
    prompt = reference.chat_ids(MESSAGES)
    expected = reference.greedy(prompt, MAX_TOKENS)
    assert len(set(expected)) > 1, "a degenerate model would hide a wrong split"
    reply = client_for(entry).chat.completions.create(model=family.replace("_", "-"), messages=MESSAGES,
                                                      max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == reference.text(expected)
    assert reply.usage.completion_tokens == len(expected)


def test_a_bf16_model_deployed_as_4bit_is_quantized_at_load_and_answers_like_mlx_lm_quantized(entry, models):
    reference = Reference(models["llama"])
    quantize_model(reference.model, {}, group_size=64, bits=4)
    prompt = reference.chat_ids(MESSAGES)
    expected = reference.greedy(prompt, MAX_TOKENS)
    reply = client_for(entry).chat.completions.create(model="llama-as-4bit", messages=MESSAGES,
                                                      max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == reference.text(expected)


@pytest.mark.parametrize("name", [family.replace("_", "-") for family in FAMILIES] + ["llama-as-4bit"])
def test_each_shard_loads_within_five_percent_of_the_bytes_planned_for_it(entry, name):
    for shard in shards_of(entry, name):
        planned, loaded = shard["spec"]["memoryBytes"], shard["status"]["bytesLoaded"]
        assert abs(loaded - planned) <= 0.05 * planned, (shard["metadata"]["name"], loaded, planned)


def test_quantized_files_deployed_as_bf16_stall_with_the_reason(entry):
    deadline = time.monotonic() + 30
    while True:
        _, _, deployed = entry.request("GET", f"{DEPLOYMENTS}/quantized-as-bf16")
        stalled = [c for c in (deployed.get("status") or {}).get("conditions", [])
                   if c["type"] == "Stalled" and c["status"] == "True"]
        if stalled:
            break
        assert time.monotonic() < deadline, deployed
        time.sleep(0.2)
    assert "spec.model.dtype: bfloat16 cannot be honoured" in stalled[0]["message"]
    assert "is quantized (4bit)" in stalled[0]["message"]
    assert shards_of(entry, "quantized-as-bf16") == []
