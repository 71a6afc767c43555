"""A tensor rank whose process ends while its node stays up is started again after a backoff, at
most RANK_RESTARTS times in a row; then it stays Failed, saying so, until its Shard's spec changes.
The rank processes are stand-ins (tests/controllers/test_tensor_shard_agent.py); the real group's
restart is tested in tests/e2e/test_tensor_restart.py."""
import asyncio

import pytest

from reconciler.controllers import shard_agent
from reconciler.controllers.shard_agent import RANK_RESTARTS, ShardAgent
from reconciler.datapath.stage import StageServer
from reconciler.store.base import make_command
from tests.controllers.test_tensor_shard_agent import Ranks, node_of, placed, settle, status, tiny_model  # noqa: F401

SHARD = "tp-r0-s0"


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch):
    monkeypatch.setattr(shard_agent, "RANK_BACKOFF_SECONDS", 0.05)


class FailingRanks(Ranks):
    """A tensor loader whose group never forms."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def __call__(self, path, **kwargs):
        self.calls += 1
        raise RuntimeError("tensor-parallel rank exited (1): the ring did not form")


async def until(predicate, *, seconds=10.0):
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_a_rank_whose_process_was_killed_is_started_again_and_served_once_more(tiny_model):
    store = await placed(tiny_model)
    ranks, server = Ranks(), StageServer()
    agent = ShardAgent(store=store, node_name=node_of(store, SHARD), stage_server=server, data_endpoint="x:1",
                       data_token="key", tensor_loader=ranks)
    try:
        await settle(agent)
        ranks.started[0].process.kill()
        await until(lambda: status(store, SHARD).get("phase") == "Failed")
        assert "restarting it in" in status(store, SHARD)["message"]
        await until(lambda: len(ranks.started) == 2 and SHARD in agent.loaded)
        await agent.reconcile()
        assert status(store, SHARD)["phase"] == "Ready"
        assert server.shard_names() == [SHARD]
        assert ranks.started[0].process.poll() is not None and ranks.started[1].process.poll() is None
    finally:
        await agent.close()


async def test_a_rank_that_keeps_failing_is_retried_a_bounded_number_of_times_then_stays_failed(tiny_model):
    store = await placed(tiny_model)
    ranks = FailingRanks()
    agent = ShardAgent(store=store, node_name=node_of(store, SHARD), stage_server=StageServer(),
                       data_endpoint="x:1", data_token="key", tensor_loader=ranks)
    try:
        await agent.reconcile()
        await until(lambda: "gave up" in status(store, SHARD).get("message", ""), seconds=30.0)
        assert ranks.calls == 1 + RANK_RESTARTS
        assert status(store, SHARD)["phase"] == "Failed"
        assert "the ring did not form" in status(store, SHARD)["message"]
        for _ in range(3):  # later passes leave it Failed
            await agent.reconcile()
        assert ranks.calls == 1 + RANK_RESTARTS and not agent.loading

        shard = store.get(("Shard", "", SHARD))
        peers = shard["spec"]["tensor"]["peers"]
        moved = {**shard["spec"], "tensor": {**shard["spec"]["tensor"],
                                             "peers": [peers[0], {**peers[1], "address": "127.0.0.1:1"}]}}
        await store.submit(make_command("replace", ("Shard", "", SHARD), body={**shard, "spec": moved},
                                        expected_rv=shard["metadata"]["resourceVersion"]))
        await agent.reconcile()
        await until(lambda: ranks.calls > 1 + RANK_RESTARTS)  # a new spec: a new count
        await until(lambda: f"restart 1 of {RANK_RESTARTS}" in status(store, SHARD).get("message", ""))
    finally:
        await agent.close()
