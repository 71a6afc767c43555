"""Writing a ModelDeployment with tensor ranks its model cannot be sharded over answers a 422
Status naming spec.parallelism.tensor and the family (dry runs too), and writes nothing; the
placement preview gives the scheduler's reason for it."""
import json

import yaml

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
