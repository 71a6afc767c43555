"""The controller manager wakes controllers on changes to the kinds they watch, runs leader-only
controllers only on the leader, and keeps going after a failed pass."""
import asyncio

from reconciler.controllers.manager import Controller, ControllerManager
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore


class Recorder(Controller):
    resync_seconds = 60

    def __init__(self, name, watches, leader_only=False, fail_first=False):
        self.name, self.watches, self.leader_only = name, watches, leader_only
        self.passes = 0
        self.fail_first = fail_first

    async def reconcile(self):
        self.passes += 1
        if self.fail_first and self.passes == 1:
            raise RuntimeError("boom")


def shard(name):
    return {"kind": "Shard", "metadata": {"name": name}}


async def settle():
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_controllers_wake_only_for_the_kinds_they_watch():
    store = MemoryStore()
    shards, nodes = Recorder("shards", ("Shard",)), Recorder("nodes", ("Node",))
    manager = ControllerManager(store=store, controllers=[shards, nodes])
    manager.start()
    await settle()
    assert (shards.passes, nodes.passes) == (1, 1)  # everyone reconciles once at start
    await store.submit(make_command("create", ("Shard", "", "s"), body=shard("s")))
    await settle()
    assert (shards.passes, nodes.passes) == (2, 1)
    await manager.stop()


async def test_leader_only_controller_runs_only_while_leader():
    store = MemoryStore(leader=False)
    scheduler = Recorder("scheduler", ("Shard",), leader_only=True)
    manager = ControllerManager(store=store, controllers=[scheduler], leadership_check_seconds=0.02)
    manager.start()
    await store.submit(make_command("create", ("Shard", "", "s"), body=shard("s")))
    await settle()
    assert scheduler.passes == 0
    store.leader = True
    await asyncio.sleep(0.1)
    assert scheduler.passes == 1
    await manager.stop()


async def test_a_failed_pass_is_retried():
    store = MemoryStore()
    flaky = Recorder("flaky", ("Shard",), fail_first=True)
    results = []
    manager = ControllerManager(store=store, controllers=[flaky], observer=lambda n, r, s: results.append(r))
    manager.start()
    await asyncio.sleep(0.4)
    assert results[:2] == ["error", "success"]
    await manager.stop()
