"""The pure state machine: apply, compare-and-set, idempotent retries and watch history."""

from reconciler.store import state as st
from reconciler.store.base import make_command
from reconciler.store.state import LAST_APPLIED, StoreState, apply

KEY = ("ModelDeployment", "default", "llama")


def manifest(source="hf://meta/llama", labels=None, replicas=1):
    return {
        "apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llama", "namespace": "default", "labels": labels or {}},
        "spec": {"model": {"source": source}, "replicas": replicas},
    }


def run(state, op, body=None, **kw):
    return apply(state, make_command(op, KEY, body=body, **kw))


def test_create_sets_server_metadata_and_bumps_revision():
    state, result = run(StoreState(), "create", manifest())
    meta = result["object"]["metadata"]
    assert result["ok"] and result["action"] == "created"
    assert state.revision == 1 and meta["resourceVersion"] == "1"
    assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"]


def test_create_twice_is_already_exists_and_changes_nothing():
    state, _ = run(StoreState(), "create", manifest())
    after, result = run(state, "create", manifest())
    assert result["code"] == 409 and result["reason"] == "AlreadyExists"
    assert after.revision == 1


def test_apply_unchanged_manifest_makes_no_new_revision():
    state, first = run(StoreState(), "apply", manifest())
    again, second = run(state, "apply", manifest())
    assert first["action"] == "created" and second["action"] == "unchanged"
    assert again.revision == state.revision == 1


def test_apply_spec_change_bumps_generation_but_label_change_does_not():
    state, _ = run(StoreState(), "apply", manifest())
    state, labelled = run(state, "apply", manifest(labels={"team": "a"}))
    assert labelled["action"] == "configured"
    assert labelled["object"]["metadata"]["generation"] == 1
    state, changed = run(state, "apply", manifest(replicas=2, labels={"team": "a"}))
    assert changed["object"]["metadata"]["generation"] == 2
    assert state.revision == 3


def test_apply_removes_labels_it_applied_before_but_keeps_labels_set_by_others():
    state, _ = run(StoreState(), "apply", manifest(labels={"team": "a", "tier": "x"}))
    live = state.objects[KEY]
    other = {**live, "metadata": {**live["metadata"], "labels": {**live["metadata"]["labels"], "owner": "ops"}}}
    state, _ = run(state, "replace", other)
    state, result = run(state, "apply", manifest(labels={"team": "a"}))
    assert result["object"]["metadata"]["labels"] == {"team": "a", "owner": "ops"}
    assert LAST_APPLIED in result["object"]["metadata"]["annotations"]


def test_replace_with_stale_resource_version_is_conflict():
    state, _ = run(StoreState(), "create", manifest())
    state, _ = run(state, "replace", manifest(replicas=2), expected_rv="1")
    after, result = run(state, "replace", manifest(replicas=3), expected_rv="1")
    assert result["code"] == 409 and result["reason"] == "Conflict"
    assert after.objects[KEY]["spec"]["replicas"] == 2


def test_status_update_keeps_generation_and_spec():
    state, _ = run(StoreState(), "create", manifest())
    state, result = run(state, "status", {"status": {"readyReplicas": 1}})
    obj = result["object"]
    assert obj["status"] == {"readyReplicas": 1} and obj["metadata"]["generation"] == 1
    assert obj["spec"] == manifest()["spec"]


def test_retried_command_applies_once():
    command = make_command("create", KEY, body=manifest())
    state, first = apply(StoreState(), command)
    again, second = apply(state, command)
    assert first == second and again.revision == 1


def test_delete_removes_object_and_records_deleted_event():
    state, _ = run(StoreState(), "create", manifest())
    state, result = run(state, "delete")
    assert KEY not in state.objects and result["action"] == "deleted"
    assert [e.type for e in state.history] == ["ADDED", "DELETED"]
    missing_state, missing = run(state, "delete")
    assert missing["code"] == 404 and missing_state.revision == 2


def test_apply_never_modifies_the_input_state():
    state, _ = run(StoreState(), "create", manifest())
    snapshot = (state.revision, dict(state.objects), state.history)
    run(state, "replace", manifest(replicas=5))
    assert (state.revision, dict(state.objects), state.history) == snapshot


def test_revisions_are_strictly_increasing_across_objects():
    state = StoreState()
    revisions = []
    for name in ("a", "b", "c"):
        state, result = apply(state, make_command("create", ("ModelDeployment", "default", name),
                                                   body={**manifest(), "metadata": {"name": name}}))
        revisions.append(result["revision"])
    assert revisions == [1, 2, 3]
    assert [e.revision for e in state.events_after(1)] == [2, 3]


def test_history_is_bounded_and_old_revisions_are_compacted(monkeypatch):
    monkeypatch.setattr(st, "HISTORY_LIMIT", 3)
    state = StoreState()
    for replicas in range(1, 6):
        state, _ = run(state, "apply", manifest(replicas=replicas))
    assert len(state.history) == 3
    assert state.compacted_revision == 2
    assert [e.revision for e in state.events_after(2)] == [3, 4, 5]


def lease(renewals):
    return make_command("apply", ("Lease", "", "node-a"), body={
        "apiVersion": "coordination.exo.dev/v1", "kind": "Lease", "metadata": {"name": "node-a"},
        "spec": {"holderIdentity": "a", "renewals": renewals}})


def test_lease_renewals_keep_their_own_history_and_never_compact_other_kinds(monkeypatch):
    monkeypatch.setattr(st, "HISTORY_LIMIT", 3)
    state, _ = run(StoreState(), "create", manifest())
    for renewals in range(10):
        state, _ = apply(state, lease(renewals))
    assert state.compacted_revision_for("ModelDeployment") == 0
    assert [e.revision for e in state.events_after(0, "ModelDeployment")] == [1]
    assert state.compacted_revision_for("Lease") == 8
    assert [e.revision for e in state.events_after(8, "Lease")] == [9, 10, 11]
    assert state.compacted_revision == 8  # a watcher of every kind needs both rings
    assert [e.revision for e in state.events_after(0)] == [1, 9, 10, 11]
