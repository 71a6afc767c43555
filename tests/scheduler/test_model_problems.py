"""The scheduler says early, with a reason naming the problem, why a model cannot be placed
(in-memory store, real model files, mlx-lm's own classes deciding what can be split)."""
import json
import shutil

import pytest

from exo_ctl.model_builder.build_model import build_model
from reconciler.controllers.scheduler import SchedulerController
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from tests.model_files import MAMBA, TWO_LAYER_LLAMA, write_model

GiB = 1024**3


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


async def scheduled(source, *, nodes=("a",), dtype=None, strategy="Spread"):
    store = MemoryStore()
    for name in nodes:
        await store.submit(make_command("create", ("Node", "", name), body={
            "apiVersion": "exo.dev/v1alpha1", "kind": "Node", "metadata": {"name": name},
            "spec": {"nodeId": name, "address": "127.0.0.1", "apiPort": 1, "raftPort": 2},
            "status": {"allocatable": {"memory": 8 * GiB}, "conditions": [{"type": "Ready", "status": "True"}]}}))
    model = {"source": str(source), **({"dtype": dtype} if dtype else {})}
    await store.submit(make_command("apply", ("ModelDeployment", "default", "m"), body={
        "apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m", "namespace": "default"},
        "spec": {"model": model, "placement": {"strategy": strategy}}}))
    await SchedulerController(store=store).reconcile()
    status = store.get(("ModelDeployment", "default", "m"))["status"]
    return {c["type"]: c for c in status["conditions"]}, store.list("Shard")[0]


def copy_with_config(tiny_model, tmp_path, edit):
    target = tmp_path / "model"
    shutil.copytree(tiny_model, target)
    config = target / "config.json"
    config.write_text(edit(config.read_text()))
    return target


async def test_a_config_that_is_not_json_is_an_invalid_model_config(tiny_model, tmp_path):
    conditions, shards = await scheduled(copy_with_config(tiny_model, tmp_path, lambda text: text[:-5]))
    ready = conditions["Ready"]
    assert ready["reason"] == "InvalidModelConfig" and "config.json: line" in ready["message"]
    assert conditions["Stalled"]["status"] == "True" and shards == []


async def test_a_config_without_a_layer_count_names_the_field(tiny_model, tmp_path):
    def drop_layers(text):
        config = json.loads(text)
        del config["num_hidden_layers"]
        return json.dumps(config)

    conditions, _ = await scheduled(copy_with_config(tiny_model, tmp_path, drop_layers))
    assert conditions["Ready"]["reason"] == "InvalidModelConfig"
    assert "num_hidden_layers must be a positive integer" in conditions["Ready"]["message"]


async def test_a_dtype_that_cannot_be_honoured_is_an_unsupported_dtype(tiny_model, tmp_path):
    def quantized(text):
        return json.dumps({**json.loads(text), "quantization": {"bits": 4, "group_size": 64}})

    conditions, _ = await scheduled(copy_with_config(tiny_model, tmp_path, quantized), dtype="bfloat16")
    assert conditions["Ready"]["reason"] == "UnsupportedDtype"
    assert conditions["Ready"]["message"].startswith("spec.model.dtype: bfloat16 cannot be honoured")


async def test_a_family_whose_layers_keep_no_kv_cache_is_refused_before_any_shard(tmp_path):
    conditions, shards = await scheduled(write_model(tmp_path / "mamba", MAMBA), nodes=("a", "b"))
    ready = conditions["Ready"]
    assert ready["reason"] == "UnsplittableModel" and "mlx_lm.models.mamba" in ready["message"]
    assert "ArraysCache" in ready["message"] and shards == []
    assert conditions["Stalled"]["status"] == "True"


async def test_a_two_layer_model_on_three_spread_nodes_says_the_third_got_nothing(tmp_path):
    conditions, shards = await scheduled(write_model(tmp_path / "two", TWO_LAYER_LLAMA), nodes=("a", "b", "c"))
    assert sorted(s["spec"]["nodeName"] for s in shards) == ["a", "b"]
    used = conditions["AllNodesUsed"]
    assert used["status"] == "False" and used["reason"] == "NodesWithoutLayers"
    assert used["message"] == ("node c got no layers: the model has 2 layers and a stage holds at least one: "
                               "2 nodes per replica at most")
    assert conditions["Stalled"]["status"] == "False"


async def test_a_spread_that_uses_every_node_says_so(tmp_path):
    conditions, shards = await scheduled(write_model(tmp_path / "two", TWO_LAYER_LLAMA), nodes=("a", "b"))
    assert len(shards) == 2 and conditions["AllNodesUsed"]["status"] == "True"
    pack, _ = await scheduled(write_model(tmp_path / "packed", TWO_LAYER_LLAMA), nodes=("a", "b"), strategy="Pack")
    assert "AllNodesUsed" not in pack
