"""An entry node without a copy of the model gets its tokenizer files from the node's WeightSupply
(``side_dir``: config and side files only, never weights); a node with its own copy reads that
copy in place. The supply here is a twin that hands out a directory of the tiny model's side files."""
from __future__ import annotations

import asyncio
import shutil

import pytest

from exo_ctl.model_builder.build_model import build_model
from reconciler.inference.backend import NotReady
from reconciler.inference.cluster import ClusterBackend
from reconciler.models.model_info import info_from_directory, model_info_object, side_files
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore

SOURCE = "hf://test-org/tiny"


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


@pytest.fixture(autouse=True)
def no_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the fallback must not try a hub


class SideFilesTwin:
    """WeightSupply's ``side_dir``: the original's side files copied into a directory of their own."""

    def __init__(self, original, root):
        self.original, self.root, self.calls = original, root, []

    async def side_dir(self, info):
        self.calls.append(info.source)
        self.root.mkdir(exist_ok=True)
        for file in side_files(self.original):
            shutil.copy(file, self.root / file.name)
        return self.root


def deployment(source):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "tiny", "namespace": "default"},
            "spec": {"model": {"source": source}, "replicas": 1},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "AllShardsReady",
                                       "message": "1/1 replicas ready"}]}}


async def create(store, body):
    await store.submit(make_command("create", (body["kind"], body["metadata"].get("namespace", ""),
                                               body["metadata"]["name"]), body=body))


async def loaded(backend, key, *, seconds=30.0):
    for _ in range(int(seconds / 0.02)):
        if key in backend._tokenizers:
            return backend._tokenizers[key]
        await asyncio.sleep(0.02)
    raise AssertionError("the tokenizer was not loaded in time")


async def test_an_entry_node_without_the_model_loads_the_tokenizer_its_supply_fetched(tiny_model, tmp_path):
    store = MemoryStore()
    info = info_from_directory(tiny_model, source=SOURCE, revision=None, origin="hub", digests=False)
    await create(store, model_info_object(info))
    supply = SideFilesTwin(tiny_model, tmp_path / "side")
    backend = ClusterBackend(store=store, supply=supply)
    try:
        await create(store, deployment(SOURCE))
        tokenizer, context_length = await loaded(backend, (SOURCE, None))
        assert supply.calls == [SOURCE]
        assert tokenizer.eos_token_ids and context_length == 2048
        assert not list((tmp_path / "side").glob("*.safetensors"))
    finally:
        await backend.close()


async def test_a_request_before_the_tokenizer_arrived_is_told_to_retry_while_it_is_fetched(tiny_model, tmp_path):
    store = MemoryStore()
    info = info_from_directory(tiny_model, source=SOURCE, revision=None, origin="hub", digests=False)
    await create(store, model_info_object(info))
    supply = SideFilesTwin(tiny_model, tmp_path / "side")
    backend = ClusterBackend(store=store, supply=supply)
    try:
        with pytest.raises(NotReady, match="this node is fetching its tokenizer"):
            backend._tokenizer(SOURCE, None)
        await loaded(backend, (SOURCE, None))
        assert supply.calls == [SOURCE]
    finally:
        await backend.close()


async def test_an_entry_node_with_its_own_copy_reads_it_in_place_and_fetches_nothing(tiny_model, tmp_path):
    store = MemoryStore()
    info = info_from_directory(tiny_model, source=str(tiny_model), revision=None, origin="node/a", digests=False)
    await create(store, model_info_object(info))
    supply = SideFilesTwin(tiny_model, tmp_path / "side")
    backend = ClusterBackend(store=store, supply=supply)
    try:
        await create(store, deployment(str(tiny_model)))
        tokenizer, _ = await loaded(backend, (str(tiny_model), None))
        assert tokenizer.eos_token_ids and supply.calls == []
    finally:
        await backend.close()
