"""The shard agent on a node without the model: it waits for the model's ModelInfo, has its
WeightSupply fetch the stage's parts into the model cache (reporting Downloading with bytes and
rate), loads the partial copy, retries a failed fetch after a backoff, and lets the cache evict
what no Shard of the node needs. The supply is a twin of WeightSupply that "fetches" from the
tiny model on this disk (the real fetch paths are tested in tests/weights)."""
import asyncio

import pytest

from exo_ctl.model_builder.build_model import build_model
from reconciler.controllers import shard_agent
from reconciler.controllers.shard_agent import ShardAgent, download_report_due
from reconciler.datapath.stage import StageServer
from reconciler.models.metadata import profile_from_directory
from reconciler.models.model_info import info_from_directory, model_info_name, model_info_object, stage_tensors
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from reconciler.weights.fetch import FetchProgress, WeightsUnavailable
from reconciler.weights.store import ModelCache

SOURCE = "hf://test-org/tiny"


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


@pytest.fixture(autouse=True)
def no_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache: this node has no copy of the hf:// model."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


class TwinSupply:
    """WeightSupply's interface; ``stage_dir`` copies the stage's missing parts from ``original``
    into a ModelCache part by part, reporting progress, after ``failures`` scripted failures."""

    def __init__(self, original, root, *, failures=0, gate=None):
        self.original, self.cache = original, ModelCache(root)
        self.failures, self.gate = failures, gate
        self.calls, self.evictions = [], []

    async def stage_dir(self, info, *, start, end, first, last, progress=None):
        self.calls.append((start, end, first, last))
        if self.failures:
            self.failures -= 1
            raise WeightsUnavailable(f"layer {start}: no source supplied it (sources: peer a (127.0.0.1:1))")
        held = self.cache.parts_held(info)
        parts = {}
        for tensor, part in stage_tensors(info, start=start, end=end, first=first, last=last).items():
            if part not in held:
                parts.setdefault(part, []).append(tensor)
        entries = {t: (f, e) for f in info.weightFiles for t, e in f.tensors.items()}
        total, done = sum(entries[t][1].size for tensors in parts.values() for t in tensors), 0
        for part, tensors in parts.items():
            data = {}
            for tensor in tensors:
                file, entry = entries[tensor]
                with open(self.original / file.name, "rb") as handle:
                    handle.seek(file.offset(tensor))
                    data[tensor] = handle.read(entry.size)
            await asyncio.to_thread(self.cache.write_part, info, part, data)
            done += sum(len(b) for b in data.values())
            if progress is not None:
                progress(FetchProgress(done=done, total=total, rate=1000.0))
            if self.gate is not None:
                await self.gate.wait()
        self.cache.write_side_file(info, "config.json", (self.original / "config.json").read_bytes())
        return self.cache.directory(model_info_name(info.source, info.revision))

    def evict(self, *, needed):
        self.evictions.append(set(needed))
        return []


def shard_body(*, index, start, end, node):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "Shard", "metadata": {"name": f"tiny-r0-s{index}"},
            "spec": {"deployment": "default/tiny", "replica": 0, "index": index, "stages": 2,
                     "layers": {"start": start, "end": end}, "totalLayers": 8, "nodeName": node,
                     "model": {"source": SOURCE}}}


async def placed(*, with_info, original):
    """Two stages of the hf:// model, [0, 4) on a and [4, 8) on b, and its ModelInfo when asked."""
    store = MemoryStore()
    for index, (start, end, node) in enumerate(((0, 4, "a"), (4, 8, "b"))):
        await store.submit(make_command("create", ("Shard", "", f"tiny-r0-s{index}"),
                                        body=shard_body(index=index, start=start, end=end, node=node)))
    if with_info:
        await publish_info(store, original)
    return store


async def publish_info(store, original):
    info = info_from_directory(original, source=SOURCE, revision=None, origin="hub", digests=False)
    body = model_info_object(info)
    await store.submit(make_command("create", (body["kind"], "", body["metadata"]["name"]), body=body))


def phases_seen(store, name):
    """Every phase the shard's status had, in commit order."""
    seen = []

    def record(state):
        shard = state.objects.get(("Shard", "", name))
        phase = ((shard or {}).get("status") or {}).get("phase")
        if phase and (not seen or seen[-1] != phase):
            seen.append(phase)
    store.add_listener(record)
    return seen


def status(store, name):
    return store.get(("Shard", "", name)).get("status") or {}


async def settle(agent):
    await agent.reconcile()
    for _, task in list(agent.loading.values()):
        await task
    await agent.reconcile()


async def until(predicate, *, seconds=30.0):
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_a_shard_without_a_copy_or_metadata_waits_pending_then_loads_its_fetched_parts(tiny_model, tmp_path):
    store = await placed(with_info=False, original=tiny_model)
    supply = TwinSupply(tiny_model, tmp_path / "cache")
    agent = ShardAgent(store=store, node_name="b", stage_server=StageServer(), data_endpoint="b:1", supply=supply)
    try:
        await settle(agent)
        assert status(store, "tiny-r0-s1")["phase"] == "Pending"
        assert status(store, "tiny-r0-s1")["message"] == f"waiting for the metadata of {SOURCE}"
        assert supply.calls == [] and not agent.loading
        await publish_info(store, tiny_model)
        await settle(agent)
        ready = status(store, "tiny-r0-s1")
        assert ready["phase"] == "Ready"
        assert ready["bytesLoaded"] == profile_from_directory(tiny_model).stage_bytes(4, 8, first=False, last=True)
        assert supply.calls == [(4, 8, False, True)]
        held = sorted(p.name for p in supply.cache.directory(model_info_name(SOURCE, None)).glob("model*.safetensors"))
        assert held == ["model-head.safetensors", "model-layer-00004.safetensors", "model-layer-00005.safetensors",
                        "model-layer-00006.safetensors", "model-layer-00007.safetensors", "model-lm_head.safetensors"]
    finally:
        await agent.close()


async def test_fetching_reports_downloading_with_bytes_and_rate_before_loading(tiny_model, tmp_path):
    store = await placed(with_info=True, original=tiny_model)
    gate = asyncio.Event()
    agent = ShardAgent(store=store, node_name="a", stage_server=StageServer(), data_endpoint="a:1",
                       supply=TwinSupply(tiny_model, tmp_path / "cache", gate=gate))
    phases = phases_seen(store, "tiny-r0-s0")
    try:
        await agent.reconcile()
        await until(lambda: status(store, "tiny-r0-s0").get("phase") == "Downloading")
        downloading = status(store, "tiny-r0-s0")
        assert 0 < downloading["bytesDownloaded"] < downloading["bytesToDownload"]
        assert downloading["downloadRate"] == 1000.0
        assert downloading["progress"] == round(downloading["bytesDownloaded"] / downloading["bytesToDownload"], 3)
        gate.set()
        await settle(agent)
        assert status(store, "tiny-r0-s0")["phase"] == "Ready"
        assert phases == ["Downloading", "Loading", "Ready"]
    finally:
        gate.set()
        await agent.close()


async def test_a_stage_whose_parts_are_all_held_goes_straight_to_loading(tiny_model, tmp_path):
    store = await placed(with_info=True, original=tiny_model)
    supply = TwinSupply(tiny_model, tmp_path / "cache")
    first = ShardAgent(store=store, node_name="a", stage_server=StageServer(), data_endpoint="a:1", supply=supply)
    await settle(first)
    await first.close()
    await store.submit(make_command("status", ("Shard", "", "tiny-r0-s0"), body={"status": {"phase": "Pending"}}))
    phases = phases_seen(store, "tiny-r0-s0")
    again = ShardAgent(store=store, node_name="a", stage_server=StageServer(), data_endpoint="a:1", supply=supply)
    try:
        await settle(again)
        assert phases == ["Loading", "Ready"]
    finally:
        await again.close()


async def test_a_failed_fetch_is_failed_with_the_reason_and_fetched_again_after_a_backoff(tiny_model, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setattr(shard_agent, "FETCH_BACKOFF_SECONDS", 0.05)
    store = await placed(with_info=True, original=tiny_model)
    supply = TwinSupply(tiny_model, tmp_path / "cache", failures=2)
    agent = ShardAgent(store=store, node_name="b", stage_server=StageServer(), data_endpoint="b:1", supply=supply)
    try:
        await settle(agent)
        failed = status(store, "tiny-r0-s1")
        assert failed["phase"] == "Failed"
        assert failed["message"].startswith("layer 4: no source supplied it (sources: peer a (127.0.0.1:1)); "
                                            "trying again in ")
        await until(lambda: "tiny-r0-s1" in agent.loaded)  # a second failure, then a fetch that works
        await agent.reconcile()
        assert status(store, "tiny-r0-s1")["phase"] == "Ready"
        assert len(supply.calls) == 3
    finally:
        await agent.close()


async def test_the_cache_may_evict_everything_but_the_models_of_this_nodes_shards(tiny_model, tmp_path):
    store = await placed(with_info=True, original=tiny_model)
    supply = TwinSupply(tiny_model, tmp_path / "cache")
    agent = ShardAgent(store=store, node_name="b", stage_server=StageServer(), data_endpoint="b:1", supply=supply)
    try:
        await settle(agent)
        await until(lambda: supply.evictions)
        assert supply.evictions[-1] == {model_info_name(SOURCE, None)}  # after the load: its own model stays
        await store.submit(make_command("delete", ("Shard", "", "tiny-r0-s1")))
        await agent.reconcile()
        await until(lambda: supply.evictions[-1] == set())  # after the unload: nothing is needed
        assert agent.loaded == {}
    finally:
        await agent.close()


@pytest.mark.parametrize(("last", "now", "fraction", "due"), [
    (None, 0.0, 0.0, True),           # the first report is written at once
    ((10.0, 0.20), 10.5, 0.25, False),  # half a second and 5 % later: not yet
    ((10.0, 0.20), 11.0, 0.21, True),   # a second later
    ((10.0, 0.20), 10.1, 0.30, True),   # 10 % further
])
def test_downloading_is_written_at_most_once_a_second_or_per_tenth_of_the_bytes(last, now, fraction, due):
    assert download_report_due(last=last, now=now, fraction=fraction) is due
