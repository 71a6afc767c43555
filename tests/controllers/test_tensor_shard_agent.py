"""The shard agent with tensor-parallel Shards: rank 0 is served on the stage server and the other
ranks are not, a rank whose process ends turns Failed with why, and new peers start a new rank.
The rank processes here are stand-ins (a process that waits on its stdin), so no ring forms; the
real group is tested in tests/e2e/test_tensor_parallel.py."""
import asyncio
import subprocess
import sys

import pytest

from exo_ctl.model_builder.build_model import build_model
from reconciler.controllers.scheduler import SchedulerController
from reconciler.controllers.shard_agent import ShardAgent
from reconciler.datapath.stage import StageServer
from reconciler.runtime.tensor_shard import TensorShard
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore
from tests.controllers.test_tensor_scheduler import md_body, node_body


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


class Ranks:
    """A tensor loader whose ranks are stand-in processes; records what it started."""

    def __init__(self) -> None:
        self.started: list[TensorShard] = []

    async def __call__(self, path, *, start, end, dtype, group, data_token, on_lost):
        process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        shard = TensorShard(process=process, group=group, start=start, end=end, num_layers=8, nbytes=1,
                            on_lost=on_lost)
        self.started.append(shard)
        return shard


async def placed(source, nodes=("a", "b")):
    store = MemoryStore()
    for name in nodes:
        await store.submit(make_command("create", ("Node", "", name), body=node_body(name)))
    await store.submit(make_command("apply", ("ModelDeployment", "default", "tp"), body=md_body(source)))
    await SchedulerController(store=store).reconcile()
    return store


async def settle(agent):
    await agent.reconcile()
    for _, task in list(agent.loading.values()):
        await task
    await agent.reconcile()


def status(store, name):
    return store.get(("Shard", "", name)).get("status") or {}


def node_of(store, name):
    return store.get(("Shard", "", name))["spec"]["nodeName"]


async def test_rank_zero_is_served_on_the_stage_server_and_the_other_rank_is_not(tiny_model):
    store = await placed(tiny_model)
    ranks = Ranks()
    servers = {n: StageServer() for n in ("a", "b")}
    agents = [ShardAgent(store=store, node_name=n, stage_server=servers[n], data_endpoint=f"{n}:1",
                         data_token="key", tensor_loader=ranks) for n in ("a", "b")]
    try:
        for agent in agents:
            await settle(agent)
        assert status(store, "tp-r0-s0")["phase"] == status(store, "tp-r0-s0-t1")["phase"] == "Ready"
        assert servers[node_of(store, "tp-r0-s0")].shard_names() == ["tp-r0-s0"]
        assert servers[node_of(store, "tp-r0-s0-t1")].shard_names() == []
    finally:
        for agent in agents:
            await agent.close()


async def test_a_rank_whose_process_ends_turns_failed_and_leaves_the_stage_server(tiny_model):
    store = await placed(tiny_model)
    ranks = Ranks()
    node = node_of(store, "tp-r0-s0")
    server = StageServer()
    agent = ShardAgent(store=store, node_name=node, stage_server=server, data_endpoint="x:1", data_token="key",
                       tensor_loader=ranks)
    try:
        await settle(agent)
        assert server.shard_names() == ["tp-r0-s0"]
        ranks.started[0].process.kill()
        for _ in range(200):
            if status(store, "tp-r0-s0").get("phase") == "Failed":
                break
            await asyncio.sleep(0.02)
        assert status(store, "tp-r0-s0")["phase"] == "Failed"
        assert "tensor-parallel group lost" in status(store, "tp-r0-s0")["message"]
        assert server.shard_names() == []
    finally:
        await agent.close()


async def test_a_node_without_the_data_path_key_fails_a_tensor_rank_with_why(tiny_model):
    store = await placed(tiny_model)
    agent = ShardAgent(store=store, node_name=node_of(store, "tp-r0-s0"), stage_server=StageServer(),
                       data_endpoint="x:1", tensor_loader=Ranks())
    await settle(agent)
    assert status(store, "tp-r0-s0")["phase"] == "Failed"
    assert "data-path key" in status(store, "tp-r0-s0")["message"]


async def test_new_peers_in_the_spec_start_a_new_rank(tiny_model):
    store = await placed(tiny_model, nodes=("a", "b", "c"))
    ranks = Ranks()
    node = node_of(store, "tp-r0-s0")
    agent = ShardAgent(store=store, node_name=node, stage_server=StageServer(), data_endpoint="x:1",
                       data_token="key", tensor_loader=ranks)
    try:
        await settle(agent)
        shard = store.get(("Shard", "", "tp-r0-s0"))
        peers = shard["spec"]["tensor"]["peers"]
        moved = {**shard["spec"], "tensor": {**shard["spec"]["tensor"],
                                             "peers": [peers[0], {**peers[1], "address": "127.0.0.1:1"}]}}
        await store.submit(make_command("replace", ("Shard", "", "tp-r0-s0"), body={**shard, "spec": moved},
                                        expected_rv=shard["metadata"]["resourceVersion"]))
        await settle(agent)
        assert len(ranks.started) == 2
        assert ranks.started[1].group.peers[1].address == "127.0.0.1:1"
        await asyncio.sleep(0.1)
        assert ranks.started[0].process.poll() is not None  # the old rank was stopped
        assert status(store, "tp-r0-s0")["phase"] == "Ready"
    finally:
        await agent.close()
