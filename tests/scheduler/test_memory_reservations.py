"""place() reserves, per node, weights + KV cache for the deployment's context and concurrency +
activations and a runtime baseline; Spread says which nodes got nothing and why."""
import pytest

from exo_ctl.api.meta import Condition, ObjectMeta
from exo_ctl.api.resources import (
    ModelDeployment, ModelDeploymentSpec, ModelSource, Node, NodeCapacity, NodeSpec, NodeStatus, Placement, Resources,
    Shard,
)
from exo_ctl.api.validation import InvalidObject, normalize
from reconciler.models import catalog_profile, profile_from_config
from reconciler.scheduler import place
from reconciler.scheduler.placement import serving_budget

GIB = 1024**3
LLAMA_8B_4BIT = catalog_profile("mlx-community/Meta-Llama-3.1-8B-Instruct-4bit")  # 32 layers, 8 KV heads of 128
KV_PER_TOKEN_PER_LAYER = 8 * 128 * 2 * 2


def node(name, memory_gib):
    return Node(metadata=ObjectMeta(name=name), spec=NodeSpec(nodeId=name, address="127.0.0.1", apiPort=1, raftPort=2),
                status=NodeStatus(allocatable=NodeCapacity(memory=int(memory_gib * GIB)),
                                  conditions=[Condition(type="Ready", status="True")]))


def deployment(name="llama", *, strategy="Pack", **resources):
    return ModelDeployment(
        metadata=ObjectMeta(name=name, namespace="default", uid=f"uid-{name}", generation=1),
        spec=ModelDeploymentSpec(model=ModelSource(source="hf://example/model"),
                                 placement=Placement(strategy=strategy), resources=Resources(**resources)))


@pytest.mark.parametrize("resources, context, concurrency", [
    ({}, 4096, 4),                                              # the model's 131072 capped at 4096; 4 requests
    ({"contextLength": 32768}, 32768, 4),
    ({"contextLength": 1024, "maxConcurrentRequests": 16}, 1024, 16),
])
def test_every_stage_reserves_the_kv_cache_of_its_own_layers(resources, context, concurrency):
    nodes = [node("a", 64), node("b", 64)]
    plan = place(deployment=deployment(strategy="Spread", **resources), nodes=nodes, shards=[], profile=LLAMA_8B_4BIT)
    assert plan.schedulable
    for a in plan.assignments:
        assert a.kv_cache_bytes == (a.end - a.start) * KV_PER_TOKEN_PER_LAYER * context * concurrency
        assert a.memory_bytes == LLAMA_8B_4BIT.stage_bytes(a.start, a.end, first=a.index == 0, last=a.index == 1)
        assert a.to_spec(deployment()).kvCacheBytes == a.kv_cache_bytes


def test_a_context_whose_kv_cache_does_not_fit_is_unschedulable_with_the_numbers_per_node():
    nodes = [node("a", 16), node("b", 16)]
    fits = place(deployment=deployment(), nodes=nodes, shards=[], profile=LLAMA_8B_4BIT)
    assert fits.schedulable
    # 32 layers × 128 KiB per token × 131072 tokens × 4 requests = 64 GiB of KV cache.
    plan = place(deployment=deployment(contextLength=131072), nodes=nodes, shards=[], profile=LLAMA_8B_4BIT)
    assert not plan.schedulable and plan.assignments == []
    assert plan.reason.startswith("needs 4.2 GiB of weights + 64.0 GiB of KV cache (4 requests × 131072 tokens) + ")
    assert plan.reason.endswith("2 Ready nodes offer 31.0 GiB (a 15.5 GiB, b 15.5 GiB)")  # after the default headroom


def test_the_default_headroom_is_kept_free():
    assert Resources().headroom_bytes == 512 * 2**20
    nodes = [node("a", 16)]
    plan = place(deployment=deployment(), nodes=nodes, shards=[], profile=LLAMA_8B_4BIT)
    (stage,) = plan.assignments
    assert stage.memory_bytes + stage.kv_cache_bytes + stage.overhead_bytes <= 16 * GIB - 512 * 2**20


def test_another_deployments_kv_cache_counts_against_the_node():
    other = deployment("other", contextLength=65536)
    taken = place(deployment=other, nodes=[node("a", 48)], shards=[], profile=LLAMA_8B_4BIT)
    assert taken.schedulable and taken.assignments[0].kv_cache_bytes == 32 * GIB
    shards = [Shard(metadata=ObjectMeta(name="other-0"), spec=a.to_spec(other)) for a in taken.assignments]
    plan = place(deployment=deployment(), nodes=[node("a", 48), node("b", 16)], shards=shards, profile=LLAMA_8B_4BIT)
    assert [a.node for a in plan.assignments] == ["b"]  # a's 48 GiB hold the other's 36 GiB reservation


def test_the_default_context_is_the_models_own_when_it_is_shorter():
    short = profile_from_config({"model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000,
                                 "max_position_embeddings": 2048})
    assert serving_budget(deployment(), short).context_length == 2048
    assert serving_budget(deployment(contextLength=8192), short).context_length == 8192


@pytest.mark.parametrize("field, value", [("contextLength", 0), ("contextLength", "long"),
                                          ("maxConcurrentRequests", 0), ("maxConcurrentRequests", 1.5)])
def test_bad_serving_numbers_are_refused_with_their_field_path(field, value):
    body = {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"},
            "spec": {"model": {"source": "hf://org/model"}, "resources": {field: value}}}
    with pytest.raises(InvalidObject) as error:
        normalize(body)
    assert [c.field for c in error.value.causes] == [f"spec.resources.{field}"]


def test_a_two_layer_model_spread_over_three_nodes_says_which_node_got_nothing_and_why():
    two_layers = profile_from_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256})
    nodes = [node("a", 8), node("b", 8), node("c", 8)]
    plan = place(deployment=deployment(strategy="Spread"), nodes=nodes, shards=[], profile=two_layers)
    assert plan.schedulable and sorted(a.node for a in plan.assignments) == ["a", "b"]
    assert plan.unused == {"c": "the model has 2 layers and a stage holds at least one: 2 nodes per replica at most"}


def test_spread_names_a_node_too_small_for_one_layer_with_its_memory():
    nodes = [node("a", 16), node("b", 16), node("tiny", 0.25)]
    plan = place(deployment=deployment(strategy="Spread", memoryHeadroom="0"), nodes=nodes, shards=[],
                 profile=LLAMA_8B_4BIT)
    assert sorted(a.node for a in plan.assignments) == ["a", "b"]
    assert plan.unused["tiny"].startswith("0.2 GiB free, less than one layer needs with its KV cache (")


def test_pack_reports_no_unused_nodes():
    plan = place(deployment=deployment(), nodes=[node("a", 16), node("b", 16)], shards=[], profile=LLAMA_8B_4BIT)
    assert len(plan.assignments) == 1 and plan.unused == {}
