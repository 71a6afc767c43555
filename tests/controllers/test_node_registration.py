"""A node lists the models it holds in its Node status (cachedModels), written on its renewals only
when that list changes, so a quiet node adds no Raft writes (in-memory store)."""
import asyncio

from exo_ctl.api.resources import Node
from reconciler.controllers.node_registration import NodeIdentity, NodeRegistrar
from reconciler.store.memory import MemoryStore

IDENTITY = NodeIdentity(name="a", node_id="id-a", address="127.0.0.1", api_port=1, raft_port=2, data_port=3)
TINY = {"name": "org-tiny-0123456789ab", "source": "hf://org/tiny", "bytes": 3_200_000,
        "complete": False, "parts": ["0-3", "embedding"], "lastUsed": "2026-12-02T04:00:00Z"}


async def eventually(check, *, what, timeout=60.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := check()):
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)
    return result


def node(store):
    return store.get(("Node", "", "a"))


async def test_cached_models_are_written_when_they_change_and_not_on_every_renewal():
    store = MemoryStore()
    held = [TINY]
    registrar = NodeRegistrar(store=store, identity=IDENTITY, lease_interval=0.01, status_interval=3600,
                              cached_models=lambda: list(held))
    registrar.start()
    try:
        await eventually(lambda: node(store) and (node(store).get("status") or {}).get("cachedModels") == [TINY],
                         what="the Node to list the model")
        version = node(store)["metadata"]["resourceVersion"]
        renewals = registrar.renewals
        await eventually(lambda: registrar.renewals >= renewals + 5, what="five more lease renewals")
        assert node(store)["metadata"]["resourceVersion"] == version
        held.append({**TINY, "name": "org-other-ba9876543210", "source": "hf://org/other", "complete": True, "parts": []})
        await eventually(lambda: len(node(store)["status"]["cachedModels"]) == 2, what="the second model")
    finally:
        await registrar.stop()
    listed = Node.model_validate(node(store)).status.cachedModels
    assert [(m.source, m.complete) for m in listed] == [("hf://org/other", True), ("hf://org/tiny", False)]


async def test_a_node_that_does_not_say_what_it_holds_keeps_whatever_its_status_lists():
    store = MemoryStore()
    registrar = NodeRegistrar(store=store, identity=IDENTITY)
    await registrar.register(models=[TINY])
    await registrar.register()
    assert node(store)["status"]["cachedModels"] == [TINY]


async def test_an_entry_the_node_api_would_refuse_is_left_out_and_the_rest_listed():
    store = MemoryStore()
    broken = {"name": "x", "source": "hf://org/x", "bytes": -1, "surprise": True}
    registrar = NodeRegistrar(store=store, identity=IDENTITY, lease_interval=0.01, status_interval=3600,
                              cached_models=lambda: [broken, TINY])
    registrar.start()
    try:
        await eventually(lambda: node(store) and (node(store).get("status") or {}).get("cachedModels"),
                         what="the Node to list its models")
    finally:
        await registrar.stop()
    assert node(store)["status"]["cachedModels"] == [TINY]
    Node.model_validate(node(store))
