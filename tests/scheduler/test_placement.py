"""place(): layers onto Ready nodes, in proportion to memory, keeping what still fits."""
import random

import pytest

from exo_ctl.api.meta import Condition, ObjectMeta
from exo_ctl.api.resources import (
    ModelDeployment, ModelDeploymentSpec, ModelSource, Node, NodeCapacity, NodeSpec, NodeStatus, Placement,
    Resources, Shard,
)
from reconciler.models import ModelProfile, catalog_profile
from reconciler.models.memory import RUNTIME_BASELINE_BYTES
from reconciler.scheduler import PlacementPlan, place, render_plan

GIB = 1024**3
# What a stage of the small test profiles needs besides weights (runtime baseline, activations):
# given to every node on top of its GiB, so the tables below are about weights.
STAGE_ALLOWANCE = RUNTIME_BASELINE_BYTES + 2**20
LLAMA_70B_4BIT = catalog_profile("mlx-community/Llama-3.3-70B-Instruct-4bit")
LLAMA_70B_BF16 = catalog_profile("meta-llama/Llama-3.3-70B-Instruct")


def node(name, memory_gib, *, ready=True, labels=None):
    return Node(
        metadata=ObjectMeta(name=name, labels=labels or {}),
        spec=NodeSpec(nodeId=name, address="127.0.0.1", apiPort=52415, raftPort=52416),
        status=NodeStatus(
            allocatable=NodeCapacity(memory=int(memory_gib * GIB) + STAGE_ALLOWANCE),
            conditions=[Condition(type="Ready", status="True" if ready else "False")],
        ),
    )


def deployment(name="llama", *, replicas=1, headroom="0", **placement):
    return ModelDeployment(
        metadata=ObjectMeta(name=name, namespace="default", uid=f"uid-{name}", generation=1),
        spec=ModelDeploymentSpec(
            model=ModelSource(source="hf://example/model"), replicas=replicas,
            placement=Placement(**placement), resources=Resources(memoryHeadroom=headroom),
        ),
    )


def profile(layers, *, layer_gib=1.0, embedding_gib=0.0, head_gib=0.0, tied=False):
    sizes = [int(layer_gib * GIB)] * layers
    return ModelProfile(
        num_layers=layers, layer_bytes=sizes, embedding_bytes=int(embedding_gib * GIB), head_bytes=int(head_gib * GIB),
        total_bytes=sum(sizes) + int(embedding_gib * GIB) + int(head_gib * GIB), dtype="bfloat16",
        hidden_size=64, vocab_size=256, tie_word_embeddings=tied,
    )


def as_shards(plan: PlacementPlan, md: ModelDeployment) -> list[Shard]:
    return [Shard(metadata=ObjectMeta(name=f"{md.metadata.name}-{a.replica}-{a.index}"), spec=a.to_spec(md))
            for a in plan.assignments]


def layout(plan, replica=0):
    return [(a.node, a.start, a.end) for a in plan.replica(replica)]


def newly_loaded(before, after):
    """Layers each node must load that it did not hold before."""
    old = {n: (s, e) for n, s, e in before}
    moved = 0
    for n, s, e in after:
        os_, oe = old.get(n, (0, 0))
        moved += (e - s) - max(0, min(e, oe) - max(s, os_))
    return moved


def assert_valid(plan, nodes, prof, *, headroom=0):
    free = {n.metadata.name: n.status.allocatable.memory - headroom for n in nodes}
    for replica in {a.replica for a in plan.assignments}:
        stages = plan.replica(replica)
        assert [a.index for a in stages] == list(range(len(stages)))
        assert stages[0].start == 0 and stages[-1].end == prof.num_layers
        assert all(a.end == b.start for a, b in zip(stages, stages[1:]))
        assert all(a.end - a.start >= 1 for a in stages)
        for a in stages:
            assert a.memory_bytes == prof.stage_bytes(a.start, a.end, first=a.index == 0, last=a.index == a.stages - 1)
            free[a.node] -= a.memory_bytes + a.kv_cache_bytes + a.overhead_bytes
    assert all(left >= 0 for left in free.values()), free


def test_llama_70b_4bit_packs_onto_three_of_four_16_gib_nodes():
    nodes = [node(f"mac-{i}", 16) for i in range(4)]
    plan = place(deployment=deployment(), nodes=nodes, shards=[], profile=LLAMA_70B_4BIT)
    assert plan.schedulable
    assert layout(plan) == [("mac-0", 0, 27), ("mac-1", 27, 54), ("mac-2", 54, 80)]
    assert_valid(plan, nodes, LLAMA_70B_4BIT)


def test_llama_70b_4bit_spreads_twenty_layers_on_each_of_four_nodes():
    nodes = [node(f"mac-{i}", 16) for i in range(4)]
    plan = place(deployment=deployment(strategy="Spread"), nodes=nodes, shards=[], profile=LLAMA_70B_4BIT)
    assert [a.end - a.start for a in plan.assignments] == [20, 20, 20, 20]
    assert_valid(plan, nodes, LLAMA_70B_4BIT)


def test_llama_70b_bf16_does_not_fit_and_the_reason_gives_both_sizes():
    nodes = [node(f"mac-{i}", 16) for i in range(4)]
    plan = place(deployment=deployment(), nodes=nodes, shards=[], profile=LLAMA_70B_BF16)
    assert not plan.schedulable and plan.assignments == []
    assert plan.reason == ("needs 131.4 GiB of weights + 5.0 GiB of KV cache (4 requests × 4096 tokens) + 1.2 GiB of "
                           "activations and runtime, 4 Ready nodes offer 64.5 GiB "
                           "(mac-0 16.1 GiB, mac-1 16.1 GiB, mac-2 16.1 GiB, mac-3 16.1 GiB)")


@pytest.mark.parametrize("memories, layers, expected", [
    ([32, 16, 16], 40, [20, 10, 10]),
    ([24, 8], 40, [30, 10]),
    ([10, 10, 10], 10, [4, 3, 3]),   # largest remainder: the leftover layer goes to the first
    ([64, 1.5], 8, [7, 1]),          # every node gets at least one layer
])
def test_spread_splits_layers_in_proportion_to_memory(memories, layers, expected):
    nodes = [node(f"n{i}", m) for i, m in enumerate(memories)]
    prof = profile(layers, layer_gib=0.25)
    plan = place(deployment=deployment(strategy="Spread"), nodes=nodes, shards=[], profile=prof)
    assert [a.end - a.start for a in plan.assignments] == expected
    assert_valid(plan, nodes, prof)


def test_embedding_and_head_count_against_the_first_and_last_node():
    nodes = [node("a", 6), node("b", 6)]
    prof = profile(10, embedding_gib=1, head_gib=1)
    plan = place(deployment=deployment(), nodes=nodes, shards=[], profile=prof)
    assert layout(plan) == [("a", 0, 5), ("b", 5, 10)]
    assert [a.memory_bytes for a in plan.assignments] == [6 * GIB, 6 * GIB]


def test_tied_embeddings_are_held_by_the_last_stage_too():
    nodes = [node("a", 6), node("b", 5)]
    prof = profile(8, embedding_gib=1, head_gib=0.5, tied=True)
    plan = place(deployment=deployment(), nodes=nodes, shards=[], profile=prof)
    last = plan.assignments[-1]
    assert last.memory_bytes == (last.end - last.start) * GIB + int(1.5 * GIB)
    assert_valid(plan, nodes, prof)


def test_proportional_split_yields_to_a_node_that_would_overflow():
    nodes = [node("a", 5.5), node("b", 8)]
    prof = profile(10, embedding_gib=1.5)  # proportional would give a 4 layers + 1.5 embedding > 5.5
    plan = place(deployment=deployment(strategy="Spread"), nodes=nodes, shards=[], profile=prof)
    assert layout(plan) == [("b", 0, 6), ("a", 6, 10)]
    assert_valid(plan, nodes, prof)


def test_node_selector_limits_placement_to_matching_nodes():
    nodes = [node("a", 64), node("b", 16, labels={"chip": "m2"}), node("c", 16, labels={"chip": "m2"})]
    plan = place(deployment=deployment(strategy="Spread", nodeSelector={"chip": "m2"}), nodes=nodes, shards=[],
                 profile=profile(8))
    assert {a.node for a in plan.assignments} == {"b", "c"}


def test_node_selector_without_matches_says_so():
    plan = place(deployment=deployment(nodeSelector={"chip": "m4"}), nodes=[node("a", 64)], shards=[], profile=profile(8))
    assert plan.reason == "no Ready node matches nodeSelector chip=m4 (1 Ready node)"


@pytest.mark.parametrize("headroom, reason", [
    ("2Gi", None),
    ("3Gi", "needs 16.0 GiB of weights + 0.0 GiB of KV cache (4 requests × 4096 tokens) + 0.3 GiB of activations "
            "and runtime, 2 Ready nodes offer 14.3 GiB (a 7.1 GiB, b 7.1 GiB)"),
])
def test_memory_headroom_is_kept_free_on_every_node(headroom, reason):
    nodes = [node("a", 10), node("b", 10)]
    plan = place(deployment=deployment(headroom=headroom), nodes=nodes, shards=[], profile=profile(16))
    assert plan.reason == reason
    if reason is None:
        assert_valid(plan, nodes, profile(16), headroom=2 * GIB)


def test_not_ready_nodes_are_never_used():
    nodes = [node("a", 16), node("b", 64, ready=False), node("c", 16)]
    plan = place(deployment=deployment(strategy="Spread"), nodes=nodes, shards=[], profile=profile(8))
    assert {a.node for a in plan.assignments} == {"a", "c"}


def test_no_ready_node_is_reported():
    plan = place(deployment=deployment(), nodes=[node("a", 16, ready=False)], shards=[], profile=profile(8))
    assert plan.reason == "none of the 1 node is Ready"


def test_other_deployments_shards_consume_node_memory():
    nodes = [node("a", 16 + STAGE_ALLOWANCE / GIB), node("b", 16)]  # a holds two stages
    other = deployment("other")
    taken = as_shards(place(deployment=other, nodes=[node("a", 16)], shards=[], profile=profile(12)), other)
    plan = place(deployment=deployment(), nodes=nodes, shards=taken, profile=profile(10))
    assert layout(plan) == [("b", 0, 10)]
    plan = place(deployment=deployment(), nodes=nodes, shards=taken, profile=profile(20))
    assert layout(plan) == [("b", 0, 16), ("a", 16, 20)]


def test_pack_uses_the_fewest_and_largest_nodes_with_name_as_tie_break():
    nodes = [node("d", 8), node("c", 16), node("b", 16), node("a", 8)]
    plan = place(deployment=deployment(), nodes=nodes, shards=[], profile=profile(24))
    assert layout(plan) == [("b", 0, 12), ("c", 12, 24)]


@pytest.mark.parametrize("bounds, stages, reason", [
    ({"minNodes": 3}, 3, None),
    ({"strategy": "Spread", "maxNodes": 2}, 2, None),
    ({"maxNodes": 2, "minNodes": 1}, 0, "needs 40.0 GiB of weights + 0.0 GiB of KV cache (4 requests × 4096 tokens) "
     "+ 0.3 GiB of activations and runtime, 2 Ready nodes (maxNodes) offer 32.3 GiB (n0 16.1 GiB, n1 16.1 GiB)"),
    ({"minNodes": 5}, 0, "minNodes is 5, but only 4 nodes with room for a layer"),
])
def test_min_and_max_nodes_bound_the_number_of_stages(bounds, stages, reason):
    nodes = [node(f"n{i}", 16) for i in range(4)]
    prof = profile(40) if reason and "40.0" in reason else profile(8)
    plan = place(deployment=deployment(**bounds), nodes=nodes, shards=[], profile=prof)
    assert plan.reason == reason
    assert len(plan.assignments) == stages


def test_a_valid_current_assignment_is_kept_exactly():
    md = deployment()
    nodes = [node("a", 16), node("b", 16), node("c", 16)]
    current = PlacementPlan.model_validate({"assignments": [
        {"replica": 0, "index": 0, "stages": 2, "start": 0, "end": 3, "total_layers": 12, "node": "c", "memory_bytes": 0},
        {"replica": 0, "index": 1, "stages": 2, "start": 3, "end": 12, "total_layers": 12, "node": "a", "memory_bytes": 0},
    ]})
    plan = place(deployment=md, nodes=nodes, shards=as_shards(current, md), profile=profile(12))
    assert layout(plan) == [("c", 0, 3), ("a", 3, 12)]


def test_a_current_assignment_that_no_longer_fits_is_replaced():
    md = deployment()
    nodes = [node("a", 16), node("b", 16)]
    current = place(deployment=md, nodes=nodes, shards=[], profile=profile(8))
    plan = place(deployment=md, nodes=[node("a", 4), node("b", 16)], shards=as_shards(current, md), profile=profile(8))
    assert layout(current) == [("a", 0, 8)] and layout(plan) == [("b", 0, 8)]


@pytest.mark.parametrize("lost, expected", [
    ("n1", [("n0", 0, 27), ("n2", 27, 60), ("n3", 60, 80)]),  # the gap splits as near 27/27/26 as it can
    ("n3", [("n0", 0, 20), ("n1", 20, 40), ("n2", 40, 80)]),
    ("n0", [("n1", 0, 40), ("n2", 40, 60), ("n3", 60, 80)]),
])
def test_when_a_node_is_lost_only_its_layers_move(lost, expected):
    md = deployment(strategy="Spread")
    nodes = [node(f"n{i}", 48) for i in range(4)]
    prof = profile(80, layer_gib=0.5)
    before = place(deployment=md, nodes=nodes, shards=[], profile=prof)
    survivors = [n for n in nodes if n.metadata.name != lost]
    after = place(deployment=md, nodes=survivors, shards=as_shards(before, md), profile=prof)
    assert layout(after) == expected
    assert newly_loaded(layout(before), layout(after)) == 20
    old = {n: (s, e) for n, s, e in layout(before)}
    assert all(s <= old[n][0] and old[n][1] <= e for n, s, e in layout(after))


def test_a_lost_node_under_pack_is_replaced_by_a_spare_at_the_same_position():
    md = deployment()
    nodes = [node(f"mac-{i}", 16) for i in range(4)]
    before = place(deployment=md, nodes=nodes, shards=[], profile=LLAMA_70B_4BIT)
    after = place(deployment=md, nodes=[n for n in nodes if n.metadata.name != "mac-1"], shards=as_shards(before, md),
                  profile=LLAMA_70B_4BIT)
    assert layout(after) == [("mac-0", 0, 27), ("mac-3", 27, 54), ("mac-2", 54, 80)]


def test_a_node_joining_under_spread_takes_layers_without_survivors_loading_any():
    md = deployment(strategy="Spread")
    prof = profile(80, layer_gib=0.5)
    nodes = [node(f"n{i}", 48) for i in range(3)]
    before = place(deployment=md, nodes=nodes, shards=[], profile=prof)
    after = place(deployment=md, nodes=[*nodes, node("n3", 48)], shards=as_shards(before, md), profile=prof)
    assert len(after.assignments) == 4
    assert [n for n, _, _ in layout(after) if n != "n3"] == ["n0", "n1", "n2"]
    assert_valid(after, [*nodes, node("n3", 48)], prof)
    new_range = next((e - s) for n, s, e in layout(after) if n == "n3")
    assert newly_loaded(layout(before), layout(after)) == new_range == 20


def test_two_replicas_land_on_disjoint_nodes():
    nodes = [node(f"n{i}", 16) for i in range(4)]
    for strategy in ("Pack", "Spread"):
        plan = place(deployment=deployment(replicas=2, strategy=strategy), nodes=nodes, shards=[], profile=profile(24))
        assert len(plan.replica(0)) == 2 and len(plan.replica(1)) == 2
        assert not {a.node for a in plan.replica(0)} & {a.node for a in plan.replica(1)}
        assert_valid(plan, nodes, profile(24))


def test_replicas_share_nodes_when_there_are_not_enough_to_keep_them_apart():
    nodes = [node("a", 16), node("b", 16), node("c", 16)]
    plan = place(deployment=deployment(replicas=2), nodes=nodes, shards=[], profile=profile(20))
    assert len({a.replica for a in plan.assignments}) == 2
    assert_valid(plan, nodes, profile(20))


def test_a_replica_that_does_not_fit_is_named_in_the_reason():
    nodes = [node("a", 16), node("b", 16)]
    plan = place(deployment=deployment(replicas=2), nodes=nodes, shards=[], profile=profile(20))
    assert len(plan.replica(0)) == 2 and plan.replica(1) == []
    assert plan.reason.startswith("replica 1: needs 20.0 GiB of weights")
    assert plan.reason.endswith("2 Ready nodes offer 12.0 GiB (a 6.0 GiB, b 6.0 GiB)")


def test_nodes_without_room_for_one_layer_report_the_memory_they_offer():
    plan = place(deployment=deployment(), nodes=[node("a", 0.5), node("b", 0.25)], shards=[], profile=profile(4))
    assert plan.reason.startswith("needs 4.0 GiB of weights")
    assert plan.reason.endswith("2 Ready nodes offer 1.0 GiB (a 0.6 GiB, b 0.4 GiB)")


def test_zero_replicas_place_nothing():
    plan = place(deployment=deployment(replicas=0), nodes=[node("a", 16)], shards=[], profile=profile(8))
    assert plan.schedulable and plan.assignments == []


@pytest.mark.parametrize("seed", range(12))
def test_random_clusters_never_overcommit_a_node(seed):
    rng = random.Random(seed)
    nodes = [node(f"n{i}", rng.choice([4, 8, 12, 16, 24])) for i in range(rng.randint(1, 6))]
    prof = profile(rng.randint(4, 40), layer_gib=rng.choice([0.25, 0.5, 1.0]), embedding_gib=0.5, head_gib=0.5)
    md = deployment(strategy=rng.choice(["Pack", "Spread"]), replicas=rng.randint(1, 2))
    plan = place(deployment=md, nodes=nodes, shards=[], profile=prof)
    assert_valid(plan, nodes, prof)
    assert plan.schedulable or plan.reason
    if plan.schedulable:
        again = place(deployment=md, nodes=nodes, shards=as_shards(plan, md), profile=prof)
        assert again.assignments == plan.assignments


def test_render_plan_shows_nodes_layers_memory_and_the_reason():
    nodes = [node(f"mac-{i}", 16) for i in range(4)]
    text = render_plan(place(deployment=deployment(), nodes=nodes, shards=[], profile=LLAMA_70B_4BIT))
    assert text.splitlines()[0].split() == ["REPLICA", "STAGE", "NODE", "LAYERS", "MEMORY", "KV", "CACHE", "OVERHEAD"]
    # 27 layers × 8 KV heads of 128 × K and V × 2 bytes × 4096 tokens × 4 requests = 1.7 GiB.
    assert text.splitlines()[1].split() == ["0", "1/3", "mac-0", "0-26", "12.7", "GiB", "1.7", "GiB", "0.3", "GiB"]
    failed = render_plan(place(deployment=deployment(), nodes=nodes, shards=[], profile=LLAMA_70B_BF16))
    assert failed.startswith("Unschedulable: needs 131.4 GiB of weights + 5.0 GiB of KV cache")
