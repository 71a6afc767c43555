"""Real ``exo`` nodes started with ``--compute-dtype auto --blas auto`` measure their fastest dtype,
report it in Node status, plan and load float files in it, and answer like mlx-lm in that dtype."""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from exo_ctl.model_builder.build_family import build_family_model
from harness.cluster import start_cluster
from harness.serving import API, APPLY, DEPLOYMENTS, Reference, client_for, shards_of, wait_nodes_ready, wait_serving
from reconciler.runtime.blas import find_openblas

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
MAX_TOKENS = 16


def _apply(node, name: str, source: Path, *, strategy: str, dtype: str | None = None, tensor: int = 1) -> None:
    dtype_line = f"    dtype: {dtype}\n" if dtype else ""
    ranks = f"  parallelism:\n    tensor: {tensor}\n" if tensor > 1 else ""
    body = (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\nspec:\n"
            f"  model:\n    source: {source}\n{dtype_line}  placement:\n    strategy: {strategy}\n{ranks}")
    status, _, reply = node.request("PATCH", f"{DEPLOYMENTS}/{name}", body=body, content_type=APPLY, timeout=60)
    assert status in (200, 201), reply


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_family_model("llama", tmp_path_factory.mktemp("compute-dtype") / "llama")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model):
    cluster = start_cluster(2, tmp_path_factory.mktemp("compute-nodes"),
                            extra_args=("--compute-dtype", "auto", "--blas", "auto"))
    try:
        wait_nodes_ready(cluster, 2)
        entry = cluster.nodes[0]
        _apply(entry, "measured", model, strategy="Spread")
        _apply(entry, "asked-bf16", model, strategy="Pack", dtype="bfloat16")
        wait_serving(entry, "measured", stages=2, timeout=120)
        wait_serving(entry, "asked-bf16", stages=1, timeout=120)
        yield cluster
    finally:
        cluster.close()
        print(cluster.logs())


def _computes(cluster) -> dict[str, dict]:
    status, _, listing = cluster.nodes[0].request("GET", f"{API}/nodes")
    assert status == 200, listing
    return {n["metadata"]["name"]: n["status"]["compute"] for n in listing["items"]}


def test_each_node_reports_the_dtype_and_blas_it_measured_at_start(cluster):
    computes = _computes(cluster)
    assert len(computes) == 2
    for compute in computes.values():
        assert compute["source"] == "measured"
        assert set(compute["matmulMs"]) == {"bfloat16", "float32"}
        assert compute["dtype"] in ("bfloat16", "float32")
        # --blas auto restarts the node (same pid) with OpenBLAS preloaded wherever it is installed.
        assert compute["blas"] == ("openblas" if find_openblas() else "reference")
        if find_openblas():  # OpenBLAS float32 matmuls measure 2.5-5x faster than MLX's bf16 loops here
            assert compute["dtype"] == "float32", compute
    for node in cluster.nodes:
        maps = Path(f"/proc/{node.proc.pid}/maps").read_text()
        assert ("libopenblas" in maps) == bool(find_openblas())


def test_a_deployment_without_dtype_answers_like_mlx_lm_in_the_measured_dtype(cluster, model):
    dtypes = {compute["dtype"] for compute in _computes(cluster).values()}
    assert len(dtypes) == 1, f"the nodes measured different dtypes: {dtypes}"
    reference = Reference(model)
    reference.model.set_dtype(getattr(mx, dtypes.pop()))
    expected = reference.greedy(reference.chat_ids(MESSAGES), MAX_TOKENS)
    reply = client_for(cluster.nodes[0]).chat.completions.create(model="measured", messages=MESSAGES,
                                                                 max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == reference.text(expected)


def test_shards_reserve_and_hold_the_bytes_of_the_dtype_they_load_in(cluster):
    computes = _computes(cluster)
    entry = cluster.nodes[0]
    (asked,) = shards_of(entry, "asked-bf16")
    bf16_bytes = asked["status"]["bytesLoaded"]
    assert abs(asked["spec"]["memoryBytes"] - bf16_bytes) <= 0.05 * bf16_bytes  # spec.model.dtype wins
    measured = shards_of(entry, "measured")
    width = {"bfloat16": 2, "float32": 4}
    total_loaded = sum(s["status"]["bytesLoaded"] for s in measured)
    scale = width[computes[measured[0]["spec"]["nodeName"]]["dtype"]] / 2
    assert abs(total_loaded - scale * bf16_bytes) <= 0.05 * scale * bf16_bytes
    for shard in measured:
        loaded = shard["status"]["bytesLoaded"]
        assert abs(shard["spec"]["memoryBytes"] - loaded) <= 0.05 * loaded, shard


def test_tensor_ranks_load_and_answer_in_the_dtype_their_nodes_measured(cluster, model):
    (dtype,) = {compute["dtype"] for compute in _computes(cluster).values()}
    entry = cluster.nodes[0]
    _apply(entry, "ranks", model, strategy="Pack", tensor=2)
    _apply(entry, "ranks-bf16", model, strategy="Pack", tensor=2, dtype="bfloat16")
    try:
        measured = wait_serving(entry, "ranks", stages=2, timeout=150)
        asked = wait_serving(entry, "ranks-bf16", stages=2, timeout=150)
        scale = {"bfloat16": 1, "float32": 2}[dtype]
        for rank, bf16 in zip(sorted(measured, key=_rank), sorted(asked, key=_rank)):
            assert rank["spec"]["tensor"]["computeDtype"] == dtype  # the scheduler's one decision
            loaded = rank["status"]["bytesLoaded"]
            for shard in (rank, bf16):  # the plan holds what the rank holds: its layers' and head's share
                assert abs(shard["spec"]["memoryBytes"] - shard["status"]["bytesLoaded"]) <= 0.02 * loaded, shard
            assert abs(loaded - scale * bf16["status"]["bytesLoaded"]) <= 0.05 * loaded, (rank, bf16)
            # The plan counts the rank at the width it loads in, as it does a pipeline stage.
            assert abs(rank["spec"]["memoryBytes"] - scale * bf16["spec"]["memoryBytes"]) <= 0.01 * loaded, (rank, bf16)
        reference = Reference(model)
        reference.model.set_dtype(getattr(mx, dtype))
        expected = reference.greedy(reference.chat_ids(MESSAGES), MAX_TOKENS)
        reply = client_for(entry).chat.completions.create(model="ranks", messages=MESSAGES,
                                                          max_tokens=MAX_TOKENS, temperature=0)
        assert reply.choices[0].message.content == reference.text(expected)
    finally:
        for name in ("ranks", "ranks-bf16"):
            entry.request("DELETE", f"{DEPLOYMENTS}/{name}")


def _rank(shard: dict) -> int:
    return shard["spec"]["tensor"]["rank"]
