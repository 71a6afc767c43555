"""Writing a ModelDeployment with tensor ranks its model cannot be sharded over answers a 422
Status naming spec.parallelism.tensor and the family (dry runs too), and writes nothing; the
placement preview gives the scheduler's reason for it."""
import json

import yaml

from reconciler.controllers.model_info import create_model_info
from reconciler.models.model_info import ModelInfoSpec, TensorEntry, WeightFile
from reconciler.server.placement_preview import placement_preview
from tests.server.server_helpers import APPLY, MD_PATH

LLAMA_70B = "hf://mlx-community/Llama-3.3-70B-Instruct-4bit"  # 64 attention heads, 8 key-value heads


def md(tensor, source=LLAMA_70B):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "tp"},
            "spec": {"model": {"source": source}, "parallelism": {"tensor": tensor}}}


async def test_apply_of_unshardable_tensor_ranks_is_a_422_invalid_status_and_writes_nothing(client, store):
    revision = store.revision
    for query in ("", "?dryRun=All"):
        answer = await client.patch(f"{MD_PATH}/tp{query}", headers=APPLY, data=yaml.safe_dump(md(3)))
        assert answer.status == 422, await answer.text()
        status = await answer.json()
        assert status["kind"] == "Status" and status["reason"] == "Invalid"
        assert status["details"]["causes"][0]["field"] == "spec.parallelism.tensor"
        assert "num_attention_heads (64) of model_type 'llama' is not divisible by 3" in status["message"]
    assert store.revision == revision and store.get(("ModelDeployment", "default", "tp")) is None


async def test_a_merge_patch_to_unshardable_ranks_is_refused_and_shardable_ranks_are_taken(client, store):
    created = await client.patch(f"{MD_PATH}/tp", headers=APPLY, data=yaml.safe_dump(md(2)))
    assert created.status == 201, await created.text()
    patch = {**APPLY, "Content-Type": "application/merge-patch+json"}
    refused = await client.patch(f"{MD_PATH}/tp", headers=patch, data=json.dumps({"spec": {"parallelism": {"tensor": 5}}}))
    assert refused.status == 422 and "spec.parallelism.tensor" in (await refused.json())["message"]
    assert store.get(("ModelDeployment", "default", "tp"))["spec"]["parallelism"]["tensor"] == 2


def test_the_placement_preview_gives_the_schedulers_reason(store):
    preview = placement_preview(store, md(3))
    assert preview["problem"] == "TensorParallelUnsupported" and preview["assignments"] == []
    assert "spec.parallelism.tensor: num_attention_heads (64)" in preview["reason"]


async def test_the_recorded_model_info_decides_for_a_model_no_node_has(client, store):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True}
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": TensorEntry(dtype="BF16", shape=[128, 64], start=0, end=16384)
               for i in range(2)}
    await create_model_info(store, ModelInfoSpec(
        source="hf://org/six-heads", origin="hub", config=config,
        weightFiles=[WeightFile(name="model.safetensors", size=32776, headerLength=0, tensors=tensors)]))
    answer = await client.patch(f"{MD_PATH}/tp", headers=APPLY, data=yaml.safe_dump(md(4, "hf://org/six-heads")))
    assert answer.status == 422, await answer.text()
    assert "num_attention_heads (6) of model_type 'llama' is not divisible by 4" in (await answer.json())["message"]
    taken = await client.patch(f"{MD_PATH}/tp", headers=APPLY, data=yaml.safe_dump(md(2, "hf://org/six-heads")))
    assert taken.status == 201, await taken.text()
