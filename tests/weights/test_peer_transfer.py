"""Weights over the real data port: two or three StageServers on 127.0.0.1 that require the
data-path token, one holding the tiny model, the others fetching a stage's parts from it (and from
each other's caches), verifying what arrives and failing over when a peer misbehaves or goes away."""
from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from reconciler.models.model_info import stage_tensors
from reconciler.store.base import make_command
from reconciler.weights.fetch import SourceFailed, SourceMissing
from reconciler.weights.peer import PeerClient
from reconciler.weights.store import is_partial_copy
from tests.weights.conftest import corrupted_copy, tensor_bytes
from tests.weights.nodes import NAME, TOKEN, Cluster
STAGE = {"start": 4, "end": 8, "first": False, "last": True}
pytestmark = pytest.mark.usefixtures("no_hf_cache")


def stage_bytes(info) -> int:
    sizes = {t: e.size for f in info.weightFiles for t, e in f.tensors.items()}
    return sum(sizes[t] for t in stage_tensors(info, **STAGE))


def assert_stage_exact(directory: Path, tiny_dir: Path, info) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    loaded, _ = load_model(directory, lazy=True, strict=False)
    original, _ = load_model(tiny_dir, lazy=True)
    ours, theirs = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(original.parameters()))
    for tensor in stage_tensors(info, **STAGE):
        assert mx.array_equal(ours[tensor], theirs[tensor]), tensor


async def test_a_node_fetches_only_its_stage_from_a_peer_over_the_data_port(tmp_path, tiny_dir, tiny_info):
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, tiny_info).start()
        await cluster.node("a", original=tiny_dir)
        await cluster.node("b")
        seen = []
        directory = await cluster.supply("b").stage_dir(tiny_info, **STAGE, progress=seen.append)

        assert is_partial_copy(directory)
        weights = sum(p.stat().st_size for p in directory.glob("model*.safetensors"))
        assert abs(weights - stage_bytes(tiny_info)) <= 0.1 * stage_bytes(tiny_info)
        assert weights < 0.6 * (tiny_dir / "model.safetensors").stat().st_size
        for side in tiny_info.sideFiles:
            assert (directory / side.name).read_bytes() == (tiny_dir / side.name).read_bytes()
        assert_stage_exact(directory, tiny_dir, tiny_info)
        side_bytes = sum(s.size for s in tiny_info.sideFiles)
        assert cluster.counts["b"].fetched == {"peer": stage_bytes(tiny_info) + side_bytes}
        assert cluster.counts["a"].served == stage_bytes(tiny_info) + side_bytes
        assert seen[-1].done == seen[-1].total == stage_bytes(tiny_info)

        again = await cluster.supply("b").stage_dir(tiny_info, **STAGE)  # held now: nothing fetched
        assert again == directory and cluster.counts["a"].served == stage_bytes(tiny_info) + side_bytes
        [entry] = cluster.supply("b").cached_models()
        assert entry["parts"] == ["4-7", "lm_head", "head"] and entry["complete"] is False


async def test_a_node_fetches_from_a_peers_partial_cache(tmp_path, tiny_dir, tiny_info):
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, tiny_info).start()
        await cluster.node("a", original=tiny_dir)
        await cluster.node("b")
        await cluster.supply("b").stage_dir(tiny_info, **STAGE)
        await cluster.servers["a"].stop()  # a goes away: only b's cache is left to fetch from
        await cluster.store.submit(make_command("delete", ("Node", "", "a")))
        b = cluster.store.get(("Node", "", "b"))
        await cluster.store.submit(make_command("status", ("Node", "", "b"), body={
            **b, "status": {"cachedModels": cluster.supply("b").cached_models()}}))
        directory = await cluster.supply("d").stage_dir(tiny_info, **STAGE)
        assert_stage_exact(directory, tiny_dir, tiny_info)
        assert cluster.counts["b"].served == cluster.counts["d"].fetched["peer"] > stage_bytes(tiny_info)


async def test_a_corrupted_copy_is_refused_and_its_tensors_fetched_from_the_other_peer(tmp_path, tiny_dir, tiny_info):
    bad_dir = corrupted_copy(tiny_dir, tiny_info, tmp_path / "bad", list(stage_tensors(tiny_info, **STAGE)))
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, tiny_info).start()
        await cluster.node("a", original=tiny_dir)
        await cluster.node("c", original=bad_dir)
        await cluster.node("b")
        directory = await cluster.supply("b").stage_dir(tiny_info, **STAGE)
        assert_stage_exact(directory, tiny_dir, tiny_info)
        counts = cluster.counts
        assert counts["b"].refused["peer"] > 0
        assert counts["c"].served > 0 and counts["b"].refused["peer"] <= counts["c"].served
        assert counts["b"].fetched["peer"] - counts["b"].refused["peer"] == \
            stage_bytes(tiny_info) + sum(s.size for s in tiny_info.sideFiles)


async def test_a_peer_that_goes_away_mid_transfer_leaves_the_rest_to_another(tmp_path, tiny_dir, tiny_info):
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, tiny_info).start()
        dying = await cluster.node("a", original=tiny_dir, rate=8 << 20)
        await cluster.node("c", original=tiny_dir)
        await cluster.node("b")
        side_bytes = sum(s.size for s in tiny_info.sideFiles)
        stopping = []

        def stop_midway() -> None:  # once a has served the side files and 1 MiB of tensors
            if not stopping and cluster.counts["a"].served > side_bytes + (1 << 20):
                stopping.append(asyncio.ensure_future(dying.stop()))
        cluster.counts["a"].on_served = stop_midway
        directory = await cluster.supply("b", parallel=2).stage_dir(tiny_info, **STAGE)
        assert_stage_exact(directory, tiny_dir, tiny_info)
        assert stopping and side_bytes < cluster.counts["a"].served < side_bytes + stage_bytes(tiny_info)
        assert cluster.counts["c"].served > 0
        assert cluster.counts["b"].fetched == {"peer": stage_bytes(tiny_info) + side_bytes}  # nothing twice


async def test_a_peer_without_the_token_gets_no_bytes(tmp_path, tiny_dir, tiny_info):
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, tiny_info).start()
        server = await cluster.node("a", original=tiny_dir)
        tensor = "model.norm.weight"
        for token in ("wrong", None):
            client = PeerClient(host="127.0.0.1", port=server.port, token=token, request_timeout_s=30)
            with pytest.raises(SourceFailed):
                await client.read(model=NAME, tensor=tensor, offset=0, length=16)
            await client.close()
        assert cluster.counts["a"].served == 0


async def test_requests_for_what_a_peer_lacks_are_answered_missing_and_the_connection_stays_up(
        tmp_path, tiny_dir, tiny_info):
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, tiny_info).start()
        server = await cluster.node("a", original=tiny_dir)
        client = PeerClient(host="127.0.0.1", port=server.port, token=TOKEN)
        stack.push_async_callback(client.close)
        with pytest.raises(SourceMissing, match="'model.nope' is not held"):
            await client.read(model=NAME, tensor="model.nope", offset=0, length=4)
        with pytest.raises(SourceMissing, match="other-model"):
            await client.read(model="other-model", tensor="model.norm.weight", offset=0, length=4)
        with pytest.raises(SourceFailed, match="length at most 8388608"):
            await client.read(model=NAME, tensor="model.norm.weight", offset=0, length=(8 << 20) + 1)
        with pytest.raises(SourceFailed, match="outside it"):
            await client.read(model=NAME, tensor="model.norm.weight", offset=0, length=1 << 20)
        tensor = "model.layers.0.mlp.up_proj.weight"
        assert await client.read(model=NAME, tensor=tensor, offset=10, length=1000) == \
            tensor_bytes(tiny_dir, tiny_info, tensor)[10:1010]
