"""The shard agent loads the Shards the scheduler gives its node with real MLX, reports their
phase, and unloads what is no longer its own (in-memory store, the tiny model)."""
import asyncio
import shutil
import threading

import pytest

from exo_ctl.model_builder.build_model import build_model
from reconciler.controllers.scheduler import SchedulerController
from reconciler.controllers.shard_agent import ShardAgent
from reconciler.datapath.stage import StageServer
from reconciler.models.metadata import profile_from_directory
from reconciler.runtime.shard_model import open_shard
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from tests.controllers.test_scheduler import add_node, md_body


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


async def scheduled(source, nodes=("a",)):
    store = MemoryStore()
    for name in nodes:
        await add_node(store, name)
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tiny"), body=md_body(source)))
    scheduler = SchedulerController(store=store)
    await scheduler.reconcile()
    return store, scheduler


async def settle(agent):
    """One pass, then wait for the loads it started, then one more pass (as the controller loop would)."""
    await agent.reconcile()
    for _, task in list(agent.loading.values()):
        await task
    await agent.reconcile()


def agent_for(store, node):
    return ShardAgent(store=store, node_name=node, stage_server=StageServer(), data_endpoint="127.0.0.1:1")


def statuses(store):
    return {s["metadata"]["name"]: s.get("status") or {} for s in store.list("Shard")[0]}


async def test_agent_loads_only_its_own_shard_and_reports_ready_with_the_bytes_it_holds(tiny_model):
    store, _ = await scheduled(tiny_model, nodes=("a", "b"))
    agent = agent_for(store, "b")
    await settle(agent)
    status = statuses(store)
    profile = profile_from_directory(tiny_model)
    mine = [s for s in store.list("Shard")[0] if s["spec"]["nodeName"] == "b"][0]
    start, end = mine["spec"]["layers"]["start"], mine["spec"]["layers"]["end"]
    assert status[mine["metadata"]["name"]]["phase"] == "Ready"
    assert status[mine["metadata"]["name"]]["bytesLoaded"] == profile.stage_bytes(start, end, first=False, last=True)
    assert list(agent.loaded) == [mine["metadata"]["name"]]
    others = [name for name, s in status.items() if name != mine["metadata"]["name"]]
    assert all(status[name] == {} for name in others)  # a's shard is a's business
    await agent.close()


async def test_weights_mlx_cannot_read_end_as_a_failed_shard_with_the_error(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:  # header intact (the scheduler can plan it), tensors cut off
        f.truncate(weights.stat().st_size // 2)
    store, _ = await scheduled(broken)
    agent = agent_for(store, "a")
    await settle(agent)
    [status] = statuses(store).values()
    assert status["phase"] == "Failed"
    assert "model.safetensors" in status["message"] or "invalid data offsets" in status["message"]
    assert not agent.loading and not agent.loaded


async def test_a_deleted_deployment_leaves_the_agent_holding_nothing(tiny_model):
    store, scheduler = await scheduled(tiny_model)
    agent = agent_for(store, "a")
    await settle(agent)
    assert agent.loaded
    await store.submit(make_command("delete", ("ModelDeployment", "default", "tiny")))
    await scheduler.reconcile()
    await settle(agent)
    assert agent.loaded == {} and store.list("Shard")[0] == []


async def test_a_load_cancelled_mid_layer_ends_without_waiting_for_its_thread(tiny_model):
    """The loader's progress blocks the compute thread on a gate the test holds: the cancelled load
    task must finish while the thread is still stuck, then the thread stops at its next layer."""
    gate = threading.Event()
    safety = threading.Timer(30, gate.set)  # only so a blocked loop cannot hang the suite
    safety.start()
    threads: list[threading.Thread] = []

    async def gated_loader(path, *, progress, **kwargs):
        def on_progress(fraction, done):
            threads.append(threading.current_thread())
            gate.wait()
            progress(fraction, done)
        return await open_shard(path, progress=on_progress, **kwargs)

    store, scheduler = await scheduled(tiny_model)
    agent = ShardAgent(store=store, node_name="a", stage_server=StageServer(), data_endpoint="127.0.0.1:1",
                       loader=gated_loader)
    try:
        await agent.reconcile()
        (_, task), = agent.loading.values()
        while not threads:  # the thread is inside the load, stuck on the gate
            await asyncio.sleep(0.01)
        await store.submit(make_command("delete", ("ModelDeployment", "default", "tiny")))
        await scheduler.reconcile()
        await agent.reconcile()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not gate.is_set() and threads[0].is_alive()  # done on the loop while the thread still loads
        assert agent.loading == {} and agent.loaded == {}
    finally:
        gate.set()
        safety.cancel()
    await asyncio.to_thread(threads[0].join, 30)
    assert not threads[0].is_alive()
    assert len(threads) == 1  # it stopped at the next layer instead of loading the rest
