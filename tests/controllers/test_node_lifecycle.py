"""Node liveness on the leader: leases observed on the leader's clock decide Ready, roles, and
removal after the grace period, never at the cost of the survivors' quorum."""

from reconciler.controllers.node_lifecycle import (
    LEASE, NodeLifecycleController, RemoveNode, Seen, SetCondition, SetRole, plan_node_health)
from reconciler.store.base import make_command
from reconciler.store.memory import MemoryStore


def node(name, ready=None, role=None):
    status = {}
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": ready}]
    if role:
        status["role"] = role
    return {"kind": "Node", "metadata": {"name": name, "resourceVersion": "1"},
            "spec": {"address": "127.0.0.1", "raftPort": 1000 + len(name)}, "status": status}


def lease(name, rv):
    return {"kind": LEASE, "metadata": {"name": name, "resourceVersion": str(rv)}}


def plan(nodes, leases, seen, now, members=3):
    return plan_node_health(nodes=nodes, leases=leases, seen=seen, now=now, timeout=3, grace=600,
                            leader="a", raft_members=members)


def test_first_sight_counts_as_fresh_so_a_new_leader_marks_nobody_not_ready():
    result = plan([node("a", "True", "leader"), node("b", "True", "follower")], {"b": lease("b", 5)}, {}, now=100)
    assert result.actions == []
    assert result.seen["b"] == Seen("5", 100)


def test_lease_unchanged_past_the_timeout_turns_node_not_ready():
    seen = {"b": Seen("5", 100)}
    result = plan([node("a", "True", "leader"), node("b", "True", "follower")], {"b": lease("b", 5)}, seen, now=103.5)
    assert result.actions == [SetCondition("b", "False", "NodeLeaseExpired", "lease not renewed for 3.5s (timeout 3s)")]


def test_renewed_lease_brings_a_node_back_to_ready():
    seen = {"b": Seen("5", 100)}
    result = plan([node("a", "True", "leader"), node("b", "False", "follower")], {"b": lease("b", 9)}, seen, now=200)
    assert SetCondition("b", "True", "LeaseRenewed", "node is renewing its lease") in result.actions


def test_roles_follow_the_leader():
    result = plan([node("a", "True", "follower"), node("b", "True", "leader")], {}, {}, now=1)
    assert SetRole("a", "leader") in result.actions and SetRole("b", "follower") in result.actions


def test_node_silent_past_grace_is_removed_when_survivors_keep_quorum():
    seen = {"b": Seen("1", 0), "c": Seen("1", 900)}
    nodes = [node("a", "True", "leader"), node("b", "False", "follower"), node("c", "True", "follower")]
    result = plan(nodes, {"b": lease("b", 1), "c": lease("c", 1)}, seen, now=901)
    assert [a for a in result.actions if isinstance(a, RemoveNode)] == [RemoveNode("b", "127.0.0.1:1001", 901)]


def test_no_removal_when_too_few_nodes_are_alive():
    seen = {"b": Seen("1", 0), "c": Seen("1", 0), "d": Seen("1", 0), "e": Seen("1", 0)}
    nodes = [node(n, "False", "follower") for n in "bcde"] + [node("a", "True", "leader")]
    result = plan(nodes, {n: lease(n, 1) for n in "bcde"}, seen, now=1000, members=5)
    assert not [a for a in result.actions if isinstance(a, RemoveNode)]


async def test_controller_marks_silent_node_not_ready_then_ready_again():
    store = MemoryStore()
    now = [0.0]
    for name in ("a", "b"):
        await store.submit(make_command("create", ("Node", "", name), body={"kind": "Node", "metadata": {"name": name},
                                                                           "spec": {"address": "127.0.0.1", "raftPort": 1}}))
        await store.submit(make_command("create", (LEASE, "", name), body={"kind": LEASE, "metadata": {"name": name}}))
    controller = NodeLifecycleController(store=store, node_name="a", timeout=3, clock=lambda: now[0])

    def ready(name):
        return [c["status"] for c in store.get(("Node", "", name))["status"]["conditions"] if c["type"] == "Ready"]

    await controller.reconcile()
    assert ready("b") == ["True"] and store.get(("Node", "", "a"))["status"]["role"] == "leader"
    now[0] = 4.0
    await controller.reconcile()
    assert ready("b") == ["False"] and ready("a") == ["True"]
    await store.submit(make_command("replace", (LEASE, "", "b"), body={"kind": LEASE, "metadata": {"name": "b"}, "spec": {"renewals": 2}}))
    await controller.reconcile()
    assert ready("b") == ["True"]
