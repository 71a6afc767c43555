"""Where a stage's weights come from: the original copy in place; else peers first and the hub
(a loopback server in the Hugging Face layout, the real huggingface_hub client) only for what no
peer holds; side files checked against their size and sha256; and what the node reports it holds."""
from __future__ import annotations

import shutil
from contextlib import AsyncExitStack

import pytest
from huggingface_hub import constants

from reconciler.models.hub import HubReader, hub_model_info
from reconciler.models.model_info import info_from_directory, model_info_name, stage_tensors
from reconciler.store.base import make_command
from reconciler.weights.fetch import WeightsUnavailable
from reconciler.weights.supply import WeightSupply, original_dir
from tests.fake_hub import FakeHub
from tests.weights.conftest import corrupted_copy, tensor_bytes
from tests.weights.nodes import Cluster, Counts

REPO = "exo-test/tiny"
LAST = {"start": 4, "end": 8, "first": False, "last": True}
pytestmark = pytest.mark.usefixtures("no_hf_cache")


@pytest.fixture
def hub(tiny_dir, monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    with FakeHub({REPO: tiny_dir}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        yield fake


def sizes(info, **stage) -> int:
    entries = {t: e for f in info.weightFiles for t, e in f.tensors.items()}
    return sum(entries[t].size for t in stage_tensors(info, **stage))


def write_cached(cache, info, directory, **stage) -> None:
    """A cache holding ``stage``'s parts and the side files, as a node that fetched them has."""
    grouped: dict = {}
    for tensor, part in stage_tensors(info, **stage).items():
        grouped.setdefault(part, []).append(tensor)
    for part, tensors in grouped.items():
        cache.write_part(info, part, {t: tensor_bytes(directory, info, t) for t in tensors})
    for side in info.sideFiles:
        cache.write_side_file(info, side.name, (directory / side.name).read_bytes())


async def test_an_original_local_copy_is_used_in_place_and_nothing_is_fetched(tmp_path, tiny_dir):
    info = info_from_directory(tiny_dir, source=str(tiny_dir), revision=None, origin="node/a", digests=False)
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, info).start()
        supply = cluster.supply("b")
        assert await supply.stage_dir(info, **LAST) == tiny_dir
        assert await supply.side_dir(info) == tiny_dir
        assert cluster.counts["b"].fetched == {} and supply.cache.cached() == []


def test_a_copy_whose_weight_files_differ_from_the_model_info_is_not_an_original(tmp_path, tiny_dir):
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    info = info_from_directory(copy, source=str(copy), revision=None, origin="node/a", digests=False)
    assert original_dir(info) == copy
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.truncate(1000)
    assert original_dir(info) is None


async def test_with_no_peer_the_hub_supplies_only_the_stage_bytes(tmp_path, hub):
    info = hub_model_info(REPO)
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, info, hub=HubReader()).start()
        served_before = hub.bytes_served(REPO)  # the ModelInfo's reads (headers, config)
        directory = await cluster.supply("b").stage_dir(info, **LAST)
        weights = sum(p.stat().st_size for p in directory.glob("model*.safetensors"))
        assert abs(weights - sizes(info, **LAST)) <= 0.1 * sizes(info, **LAST)
        side = sum(s.size for s in info.sideFiles)
        assert cluster.counts["b"].fetched == {"hub": sizes(info, **LAST) + side}
        assert hub.bytes_served(REPO) - served_before == sizes(info, **LAST) + side


async def test_peers_are_asked_first_and_the_hub_only_for_what_no_peer_holds(tmp_path, tiny_dir, hub):
    info = hub_model_info(REPO)
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, info, hub=HubReader()).start()
        write_cached(cluster.cache("a"), info, tiny_dir, start=4, end=8, first=False, last=False)
        await cluster.node("a")  # lists parts 4-7 (and the side files it holds)
        served_before = hub.bytes_served(REPO)
        directory = await cluster.supply("b").stage_dir(info, **LAST)
        from_hub = sizes(info, **LAST) - sizes(info, start=4, end=8, first=False, last=False)
        assert hub.bytes_served(REPO) - served_before == from_hub  # lm_head and the final norm
        assert cluster.counts["b"].fetched["hub"] == from_hub
        assert cluster.counts["b"].fetched["peer"] == cluster.counts["a"].served > 0
        assert sorted(p.name for p in directory.glob("model*.safetensors")) == [
            "model-head.safetensors", "model-layer-00004.safetensors", "model-layer-00005.safetensors",
            "model-layer-00006.safetensors", "model-layer-00007.safetensors", "model-lm_head.safetensors"]


async def test_a_whole_model_from_a_corrupted_peer_fails_the_hubs_file_digest_and_comes_from_the_hub(
        tmp_path, tiny_dir, hub):
    info = hub_model_info(REPO)  # per-file sha256 only (the LFS oid), no per-tensor digests
    assert info.weightFiles[0].sha256 and not any(t.sha256 for t in info.weightFiles[0].tensors.values())
    bad = corrupted_copy(tiny_dir, info, tmp_path / "bad", ["model.layers.3.mlp.up_proj.weight"])
    whole = {"start": 0, "end": 8, "first": True, "last": True}
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, info, hub=HubReader()).start()
        await cluster.node("a", original=bad)
        directory = await cluster.supply("b").stage_dir(info, **whole)
        counts = cluster.counts["b"]
        assert counts.refused["peer"] == sizes(info, **whole)
        assert counts.fetched["hub"] >= sizes(info, **whole)
        for tensor in stage_tensors(info, **whole):
            assert cluster.cache("b").read_tensor(cluster.name, tensor, offset=0, length=16) == \
                tensor_bytes(tiny_dir, info, tensor)[:16]
        assert directory == cluster.cache("b").directory(cluster.name)


async def test_a_corrupted_side_file_from_a_peer_is_refused_and_fetched_from_another(tmp_path, tiny_dir, tiny_info):
    bad = shutil.copytree(tiny_dir, tmp_path / "bad")
    raw = bytearray((bad / "tokenizer.json").read_bytes())
    raw[100] ^= 0x01
    (bad / "tokenizer.json").write_bytes(bytes(raw))  # same size, different bytes
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, tiny_info).start()
        await cluster.node("a", original=bad)  # asked first for side files (peers in name order)
        await cluster.node("c", original=tiny_dir)
        directory = await cluster.supply("b").side_dir(tiny_info)
        assert (directory / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
        assert cluster.counts["b"].refused == {"peer": len(raw)}
        assert not list(directory.glob("model*.safetensors"))  # side files only


async def test_when_no_source_holds_some_parts_the_error_names_them_and_the_sources_tried(tmp_path, tiny_dir,
                                                                                          tiny_info):
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, tiny_info).start()
        write_cached(cluster.cache("a"), tiny_info, tiny_dir, start=4, end=6, first=False, last=False)
        await cluster.node("a")
        with pytest.raises(WeightsUnavailable) as caught:
            await cluster.supply("b").stage_dir(tiny_info, **LAST)
        message = str(caught.value)
        assert "part(s) 6, 7, head, lm_head" in message and "sources: peer a (127.0.0.1:" in message
        assert cluster.cache("b").parts_held(tiny_info) == {4, 5}  # what did arrive is kept


async def test_cached_models_lists_original_copies_of_deployed_models_and_the_cache(tmp_path, tiny_dir, tiny_info):
    local = info_from_directory(tiny_dir, source=str(tiny_dir), revision=None, origin="node/b", digests=False)
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, tiny_info).start()
        name = model_info_name(str(tiny_dir), None)
        await cluster.store.submit(make_command("create", ("ModelInfo", "", name), body={
            "kind": "ModelInfo", "metadata": {"name": name}, "spec": local.model_dump(exclude_none=True)}))
        await cluster.store.submit(make_command("create", ("ModelDeployment", "default", "tiny"), body={
            "kind": "ModelDeployment", "metadata": {"name": "tiny", "namespace": "default"},
            "spec": {"model": {"source": str(tiny_dir)}}}))
        write_cached(cluster.cache("b"), tiny_info, tiny_dir, start=0, end=2, first=True, last=False)
        supply = cluster.supply("b")
        original, partial = supply.cached_models()
        assert original == {"name": name, "source": str(tiny_dir), "revision": None, "complete": True, "parts": [],
                            "bytes": sum(p.stat().st_size for p in tiny_dir.iterdir()), "lastUsed": None}
        assert partial["name"] == cluster.name and partial["parts"] == ["0-1", "embedding"]
        assert not partial["complete"]


async def test_a_stage_is_fetched_over_tls_when_the_data_path_uses_it(tmp_path, tiny_dir, tiny_info):
    from reconciler.tls import ClusterCA, ensure_node_certificate

    ca = ClusterCA.create()
    tls = {}
    for node in ("a", "b"):
        (tmp_path / node).mkdir()
        tls[node] = ensure_node_certificate(ca, data_dir=tmp_path / node, node=node,
                                            hosts=["127.0.0.1"]).data_path(loopback=True)
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, tiny_info, tls=tls).start()
        await cluster.node("a", original=tiny_dir)
        directory = await cluster.supply("b").stage_dir(tiny_info, **LAST)
        tensor = "model.layers.7.mlp.down_proj.weight"
        assert cluster.cache("b").read_tensor(cluster.name, tensor, offset=0, length=64) == \
            tensor_bytes(tiny_dir, tiny_info, tensor)[:64]
        assert directory.is_dir()


def test_a_supply_needs_nothing_but_its_arguments(tmp_path):
    from reconciler.store.memory import MemoryStore
    from reconciler.weights.store import ModelCache

    supply = WeightSupply(node_name="n", cache=ModelCache(tmp_path), store=MemoryStore(), data_token=None,
                          metrics=Counts())
    assert supply.cached_models() == [] and supply.evict(needed=set()) == []


async def test_an_original_copy_is_listed_before_its_model_info_exists(tmp_path, tiny_dir, tiny_info):
    async with AsyncExitStack() as stack:
        cluster = await Cluster(stack, tmp_path, tiny_info).start()
        await cluster.store.submit(make_command("create", ("ModelDeployment", "default", "tiny"), body={
            "kind": "ModelDeployment", "metadata": {"name": "tiny", "namespace": "default"},
            "spec": {"model": {"source": str(tiny_dir)}}}))
        await cluster.store.submit(make_command("create", ("ModelDeployment", "default", "elsewhere"), body={
            "kind": "ModelDeployment", "metadata": {"name": "elsewhere", "namespace": "default"},
            "spec": {"model": {"source": str(tmp_path / "not-here")}}}))
        [entry] = cluster.supply("b").cached_models()
        assert entry["source"] == str(tiny_dir) and entry["complete"] is True
