"""place() with spec.parallelism.tensor: the ranks of a stage on distinct nodes, each holding about
1/N of the stage's layer weights, current groups kept, and reasons when nothing fits."""
from exo_ctl.api.meta import ObjectMeta
from exo_ctl.api.resources import (
    ModelDeployment, ModelDeploymentSpec, ModelSource, Parallelism, Placement, Resources, Shard, TensorGroup,
    TensorPeer,
)
from reconciler.scheduler import place
from tests.scheduler.test_placement import node, profile

GIB = 1024**3


def deployment(*, tensor=2, strategy="Pack", replicas=1, **placement):
    return ModelDeployment(
        metadata=ObjectMeta(name="tp", namespace="default", uid="uid-tp", generation=1),
        spec=ModelDeploymentSpec(model=ModelSource(source="hf://example/model"), replicas=replicas,
                                 placement=Placement(strategy=strategy, **placement),
                                 resources=Resources(memoryHeadroom="0"), parallelism=Parallelism(tensor=tensor)),
    )


def groups(plan):
    """(replica, stage, layers) → nodes in rank order."""
    out: dict[tuple[int, int, tuple[int, int]], list[str]] = {}
    for a in sorted(plan.assignments, key=lambda a: a.tensor_rank):
        out.setdefault((a.replica, a.index, (a.start, a.end)), []).append(a.node)
    return out


def as_shards(plan, md):
    shards = []
    for a in plan.assignments:
        tensor = TensorGroup(rank=a.tensor_rank, size=len(a.tensor_nodes),
                             peers=[TensorPeer(node=n, address=f"127.0.0.1:{20000 + i}") for i, n in enumerate(a.tensor_nodes)])
        shards.append(Shard(metadata=ObjectMeta(name=f"tp-{a.index}-{a.tensor_rank}"), spec=a.to_spec(md, tensor=tensor)))
    return shards


def test_a_model_that_fits_one_group_gets_one_stage_over_two_distinct_nodes():
    plan = place(deployment=deployment(), nodes=[node("a", 8), node("b", 8), node("c", 8)], shards=[],
                 profile=profile(8, layer_gib=1.0))
    assert plan.schedulable, plan.reason
    (nodes,) = groups(plan).values()
    assert len(nodes) == len(set(nodes)) == 2
    assert {a.tensor_rank for a in plan.assignments} == {0, 1}
    assert all(a.tensor_nodes == nodes for a in plan.assignments)


def test_each_rank_holds_half_the_layer_weights_plus_the_unsplit_embeddings():
    prof = profile(8, layer_gib=1.0, embedding_gib=0.5, head_gib=0.5)
    plan = place(deployment=deployment(), nodes=[node("a", 16), node("b", 16)], shards=[], profile=prof)
    assert plan.schedulable, plan.reason
    assert [a.memory_bytes for a in plan.assignments] == [int(4 * GIB + 1 * GIB)] * 2


def test_an_untied_float_head_is_split_like_the_layers_and_a_quantized_or_indivisible_one_is_not():
    base = profile(8, layer_gib=1.0, embedding_gib=0.5, head_gib=0.5)
    head = base.model_copy(update={"lm_head_bytes": int(0.5 * GIB) - 4096})  # the rest: the final norm

    def ranks(prof):
        plan = place(deployment=deployment(), nodes=[node("a", 16), node("b", 16)], shards=[], profile=prof)
        assert plan.schedulable, plan.reason
        return [a.memory_bytes for a in plan.assignments]

    assert ranks(head) == [int(4 * GIB + 0.5 * GIB + 4096 + (0.5 * GIB - 4096) / 2)] * 2  # as the worker shards it
    odd = head.model_copy(update={"vocab_size": head.vocab_size + 1})
    assert ranks(odd) == ranks(base) == [int(4 * GIB + 1 * GIB)] * 2  # rows the group does not divide
    quantized = head.model_copy(update={"quantization_bits": 4, "dtype": "4bit"})
    assert ranks(quantized) == ranks(base)


def test_a_model_too_big_for_one_group_is_piped_over_two_groups():
    plan = place(deployment=deployment(), nodes=[node(n, 5) for n in "abcd"], shards=[],
                 profile=profile(16, layer_gib=1.0))
    assert plan.schedulable, plan.reason
    stages = groups(plan)
    assert len(stages) == 2
    used = [n for nodes in stages.values() for n in nodes]
    assert sorted(used) == ["a", "b", "c", "d"]
    assert all(a.memory_bytes <= 5 * GIB for a in plan.assignments)


def test_fewer_ready_nodes_than_ranks_is_unschedulable_with_the_count():
    plan = place(deployment=deployment(tensor=3), nodes=[node("a", 8), node("b", 8), node("c", 8, ready=False)],
                 shards=[], profile=profile(4))
    assert plan.reason == "spec.parallelism.tensor is 3: each stage needs 3 distinct Ready nodes, but 2 match"


def test_a_group_whose_smallest_node_cannot_hold_its_half_does_not_fit():
    plan = place(deployment=deployment(), nodes=[node("a", 16), node("b", 1)], shards=[], profile=profile(8))
    assert not plan.schedulable
    assert "a+b" in plan.reason


def test_the_current_group_is_kept_when_a_bigger_node_joins():
    md = deployment()
    first = place(deployment=md, nodes=[node("a", 8), node("b", 8)], shards=[], profile=profile(4))
    again = place(deployment=md, nodes=[node("a", 8), node("b", 8), node("z", 64)], shards=as_shards(first, md),
                  profile=profile(4))
    assert groups(again) == groups(first)


def test_a_lost_rank_node_is_replaced_by_a_free_node():
    md = deployment()
    first = place(deployment=md, nodes=[node("a", 8), node("b", 8), node("c", 4)], shards=[], profile=profile(4))
    assert list(groups(first).values()) == [["a", "b"]]
    again = place(deployment=md, nodes=[node("a", 8), node("b", 8, ready=False), node("c", 4)],
                  shards=as_shards(first, md), profile=profile(4))
    assert sorted(list(groups(again).values())[0]) == ["a", "c"]


def test_tensor_one_places_exactly_as_a_pipeline():
    nodes, prof = [node("a", 4), node("b", 4)], profile(6)
    plain = place(deployment=deployment(tensor=1, strategy="Spread"), nodes=nodes, shards=[], profile=prof)
    assert [(a.node, a.start, a.end, a.tensor_nodes) for a in plain.assignments] == [("a", 0, 3, []), ("b", 3, 6, [])]
