"""place() counts the bytes of the dtype each node serves float files in (Node status.compute)."""
from exo_ctl.api.meta import Condition, ObjectMeta
from exo_ctl.api.resources import (
    ModelDeployment, ModelDeploymentSpec, ModelSource, Node, NodeCapacity, NodeCompute, NodeSpec, NodeStatus,
    Parallelism, Placement, Shard,
)
from reconciler.models import ModelProfile
from reconciler.models.memory import RUNTIME_BASELINE_BYTES
from reconciler.controllers.scheduler import desired_shards
from reconciler.scheduler import place

GIB = 1024**3
ALLOWANCE = 2 * (RUNTIME_BASELINE_BYTES + 2**20)  # a stage's baseline, doubled on a float32 node


def node(name, memory_gib, *, dtype=""):
    return Node(
        metadata=ObjectMeta(name=name),
        spec=NodeSpec(nodeId=name, address="127.0.0.1", apiPort=52415, raftPort=52416),
        status=NodeStatus(allocatable=NodeCapacity(memory=int(memory_gib * GIB) + ALLOWANCE),
                          compute=NodeCompute(dtype=dtype, source="measured" if dtype else "files"),
                          conditions=[Condition(type="Ready", status="True")]),
    )


def deployment(*, dtype=None, strategy="Pack"):
    return ModelDeployment(
        metadata=ObjectMeta(name="llama", namespace="default", uid="uid-llama", generation=1),
        spec=ModelDeploymentSpec(model=ModelSource(source="hf://example/model", dtype=dtype),
                                 placement=Placement(strategy=strategy)),
    )


def profile(layers=8, *, dtype="bfloat16"):
    sizes = [GIB] * layers
    return ModelProfile(num_layers=layers, layer_bytes=sizes, embedding_bytes=0, head_bytes=0, total_bytes=sum(sizes),
                        dtype=dtype, hidden_size=64, vocab_size=256)


def test_a_bf16_model_that_fits_a_node_in_bf16_does_not_fit_it_in_float32():
    assert place(deployment=deployment(), nodes=[node("a", 9)], shards=[], profile=profile()).assignments
    plan = place(deployment=deployment(), nodes=[node("a", 9, dtype="float32")], shards=[], profile=profile())
    assert not plan.assignments and plan.reason


def test_a_float32_node_takes_half_the_layers_its_memory_would_hold_in_bf16():
    nodes = [node("a", 9, dtype="float32"), node("b", 9)]
    plan = place(deployment=deployment(strategy="Spread"), nodes=nodes, shards=[], profile=profile(12))
    layers = {a.node: a.end - a.start for a in plan.assignments}
    assert layers == {"a": 4, "b": 8}  # in proportion to what each holds in its dtype


def test_the_shards_reserve_the_bytes_the_node_will_really_hold():
    md = deployment()
    plan = place(deployment=md, nodes=[node("a", 20, dtype="float32")], shards=[], profile=profile())
    (stage,) = plan.assignments
    assert stage.memory_bytes == 16 * GIB
    shards = [Shard(metadata=ObjectMeta(name="llama-0-0"), spec=stage.to_spec(md))]
    other = ModelDeployment(metadata=ObjectMeta(name="other", namespace="default", uid="uid-other", generation=1),
                            spec=md.spec)
    # What is left (20 - 16 GiB) holds 2 bf16 layers in float32, not 4.
    assert not place(deployment=other, nodes=[node("a", 20, dtype="float32")], shards=shards,
                     profile=profile(3)).assignments
    assert place(deployment=other, nodes=[node("a", 20, dtype="float32")], shards=shards,
                 profile=profile(1)).assignments


def test_an_asked_dtype_or_quantized_files_are_planned_as_they_are():
    nodes = [node("a", 9, dtype="float32")]
    assert place(deployment=deployment(dtype="bfloat16"), nodes=nodes, shards=[], profile=profile()).assignments
    assert place(deployment=deployment(), nodes=nodes, shards=[], profile=profile(dtype="4bit")).assignments


def test_tensor_ranks_are_planned_at_their_group_s_common_dtype_and_a_mixed_group_at_the_files():
    md = deployment()
    md = md.model_copy(update={"spec": md.spec.model_copy(update={"parallelism": Parallelism(tensor=2)})})

    def ranks(dtype_a, dtype_b):
        plan = place(deployment=md, nodes=[node("a", 20, dtype=dtype_a), node("b", 20, dtype=dtype_b)], shards=[],
                     profile=profile())
        assert plan.schedulable, plan.reason
        # What the ranks will load in is what was planned, written into every rank's Shard.
        shards = desired_shards(md, plan, hosts={"a": "127.0.0.1", "b": "127.0.0.1"})
        loads = {body["spec"]["tensor"].get("computeDtype") for body in shards.values()}
        assert len(shards) == 2 and len(loads) == 1
        return sorted(a.memory_bytes for a in plan.assignments), loads.pop()

    assert ranks("float32", "float32") == ([8 * GIB, 8 * GIB], "float32")  # 8 bf16 layers, halved, widened
    assert ranks("bfloat16", "bfloat16") == ([4 * GIB, 4 * GIB], "bfloat16")
    assert ranks("float32", "bfloat16") == ([4 * GIB, 4 * GIB], None)  # every rank loads the files' dtype
    assert ranks("", "") == ([4 * GIB, 4 * GIB], None)
