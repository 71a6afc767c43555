"""Quorum, staleness and in-flight writes of the Raft store under a cut, three peers in one process.
A cut drops messages inside one peer's PySyncObj transport while its TCP connections stay up."""

import pytest

from reconciler.store.base import StoreUnavailable, make_command
from tests.store.test_raft_store import BODY, KEY, cluster, wait_for  # noqa: F401 (fixture)


def cut(store, drop=lambda message: True):
    """Drop what ``drop`` selects, to and from ``store``'s peer; returns the heal function."""
    transport = store._sync._SyncObj__transport
    receive, send = transport._onMessageReceivedCallback, transport.send
    transport._onMessageReceivedCallback = lambda node, message: None if drop(message) else receive(node, message)
    transport.send = lambda node, message: True if drop(message) else send(node, message)

    def heal():
        transport._onMessageReceivedCallback, transport.send = receive, send
    return heal


def leader_of(stores):
    return next(s for s in stores if s.is_leader)


async def test_a_cut_off_leader_loses_quorum_refuses_writes_and_the_majority_goes_on(cluster):
    leader = leader_of(cluster)
    heal = cut(leader)
    try:
        await wait_for(lambda: not leader.has_quorum, timeout=5, what="the cut-off leader to lose quorum")
        assert "no quorum" in leader.unready_reason()
        with pytest.raises(StoreUnavailable, match="no quorum"):
            await leader.submit(make_command("create", KEY, body=BODY), timeout=30)
        rest = [s for s in cluster if s is not leader]
        await wait_for(lambda: any(s.is_leader and s.has_quorum for s in rest), what="a new leader")
        result = await rest[0].submit(make_command("create", KEY, body=BODY))
        assert result["action"] == "created"
    finally:
        heal()
    await wait_for(lambda: leader.revision == result["revision"] and leader.unready_reason() is None,
                   what="the healed node to catch up")


async def test_a_write_in_flight_when_quorum_is_lost_fails_before_its_timeout(cluster):
    leader = leader_of(cluster)
    heal = cut(leader)
    try:
        with pytest.raises(StoreUnavailable, match="lost quorum"):
            await leader.submit(make_command("create", KEY, body=BODY), timeout=60)
    finally:
        heal()


async def test_a_follower_that_hears_the_leader_but_applies_nothing_is_unready_until_it_catches_up(cluster):
    leader = leader_of(cluster)
    follower = next(s for s in cluster if s is not leader)
    heal = cut(follower, drop=lambda message: isinstance(message, dict) and bool(message.get("entries")))
    try:
        for n in range(3):
            await leader.submit(make_command("apply", ("ModelDeployment", "default", f"m{n}"),
                                             body={**BODY, "metadata": {"name": f"m{n}"}}))
        await wait_for(lambda: (follower.unready_reason() or "").startswith("this replica is behind"),
                       what="the lagging follower to say it is behind")
        assert follower.has_quorum and follower.revision < leader.revision
    finally:
        heal()
    await wait_for(lambda: follower.unready_reason() is None and follower.revision == leader.revision,
                   what="the follower to catch up")
