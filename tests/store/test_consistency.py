"""The pure part of the replica consistency check: digests, checkpoints and the majority rule."""
from reconciler.store.consistency import Checkpoints, judge, state_digest
from reconciler.store.state import StoreState, apply



def states(n: int) -> list[StoreState]:
    out, state = [], StoreState()
    for i in range(n):
        state, _ = apply(state, {"op": "create", "opId": f"op{i}", "kind": "ModelDeployment", "namespace": "default",
                                 "name": f"m{i}", "now": "2026-01-01T00:00:00Z", "uid": f"u{i}",
                                 "object": {"metadata": {"name": f"m{i}"}, "spec": {"n": i}}})
        out.append(state)
    return out


def test_replicas_that_applied_the_same_commands_have_the_same_digest():
    assert state_digest(states(5)[-1]) == state_digest(states(5)[-1])


def test_one_changed_field_changes_the_digest():
    state = states(3)[-1]
    key = ("ModelDeployment", "default", "m1")
    edited = StoreState(revision=state.revision, objects={**state.objects, key: {**state.objects[key], "spec": {"n": 9}}})
    assert state_digest(edited) != state_digest(state)


def test_checkpoints_keep_only_every_nth_revision_and_the_newest_few():
    checkpoints = Checkpoints(every=2, kept=2)
    for state in states(9):
        checkpoints.record(state)
    assert sorted(checkpoints.digests()) == [6, 8]


def test_a_node_that_differs_from_the_majority_at_the_newest_revision_they_agree_on_is_diverged():
    verdict = judge({16: "bad", 32: "bad2"}, {"b": {16: "good", 32: "good2"}, "c": {16: "good"}}, members=3)
    assert verdict.agrees is False and verdict.revision == 16 and "revision 16" in verdict.message


def test_the_majority_node_agrees_and_names_the_diverged_peer():
    verdict = judge({16: "good"}, {"b": {16: "good"}, "c": {16: "bad"}}, members=3)
    assert verdict.agrees is True and verdict.diverged_peers == ("c",) and verdict.agreeing_peers == ("b",)


def test_a_revision_only_this_node_has_is_not_compared():
    verdict = judge({48: "x", 32: "good"}, {"b": {32: "good"}}, members=3)
    assert verdict.agrees is True and verdict.revision == 32


def test_nothing_is_decided_without_a_majority_digest_or_without_peers():
    assert judge({16: "a"}, {"b": {16: "b"}}, members=3).agrees is None
    assert judge({16: "a"}, {}, members=3).agrees is None
