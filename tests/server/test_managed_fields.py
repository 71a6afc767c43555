"""Server-side apply field ownership: the FieldsV1 form, conflicts as a 409 Status naming each
field and manager, force, removal of fields no manager applies any more, and updates."""
from __future__ import annotations

import json

import pytest

from reconciler.server import managed_fields as mf
from reconciler.server.errors import ApiError
from tests.server.server_helpers import APPLY, AUTH, MD_PATH, deployment

NOW = "2026-12-02T00:00:00Z"
MERGE = {**AUTH, "Content-Type": "application/merge-patch+json"}


def test_fields_v1_round_trips_through_kubernetes_f_keys():
    paths = mf.leaves(deployment(labels={"app": "chat"}))
    tree = mf.to_fields_v1(set(paths))
    assert tree["f:metadata"] == {"f:labels": {"f:app": {}}}
    assert tree["f:spec"] == {"f:model": {"f:source": {}}, "f:replicas": {}}
    assert mf.from_fields_v1(tree) == set(paths)


def test_an_apply_changing_a_field_another_manager_applied_is_a_conflict_unless_forced():
    obj, entries = mf.apply(None, deployment(replicas=2), manager="alice", force=False, now=NOW)
    live = {**obj, "metadata": {**obj["metadata"], "managedFields": entries}}
    with pytest.raises(ApiError) as raised:
        mf.apply(live, deployment(replicas=3), manager="bob", force=False, now=NOW)
    assert raised.value.code == 409
    assert [(c.field, c.message, c.reason) for c in raised.value.causes] == [
        (".spec.replicas", 'conflict with "alice" using exo.dev/v1alpha1', "FieldManagerConflict")]
    forced, entries = mf.apply(live, deployment(replicas=3), manager="bob", force=True, now=NOW)
    assert forced["spec"]["replicas"] == 3
    by_manager = {e["manager"]: mf.from_fields_v1(e["fieldsV1"]) for e in entries}
    assert ("spec", "replicas") in by_manager["bob"] and ("spec", "replicas") not in by_manager["alice"]


def test_a_field_dropped_from_the_manifest_goes_unless_another_manager_owns_it():
    obj, entries = mf.apply(None, deployment(labels={"a": "1", "b": "2"}), manager="alice", force=False, now=NOW)
    live = {**obj, "metadata": {**obj["metadata"], "managedFields": entries}}
    obj, entries = mf.apply(live, deployment(labels={"b": "2"}), manager="bob", force=False, now=NOW)
    live = {**obj, "metadata": {**obj["metadata"], "managedFields": entries}}
    obj, _ = mf.apply(live, deployment(labels={}), manager="alice", force=False, now=NOW)
    assert obj["metadata"]["labels"] == {"b": "2"}


def test_an_update_takes_the_fields_it_changed_and_keeps_unchanged_entries_as_they_were():
    obj, entries = mf.apply(None, deployment(replicas=2), manager="alice", force=False, now=NOW)
    live = {**obj, "metadata": {**obj["metadata"], "managedFields": entries}}
    new = {**obj, "spec": {**obj["spec"], "replicas": 5}}
    after = mf.update(live, new, manager="scaler", now="2026-12-02T01:00:00Z")
    by_manager = {e["manager"]: mf.from_fields_v1(e["fieldsV1"]) for e in after}
    assert by_manager["scaler"] == {("spec", "replicas")}
    assert ("spec", "replicas") not in by_manager["alice"] and ("spec", "model", "source") in by_manager["alice"]
    assert mf.update(live, obj, manager="scaler", now="later") == entries  # nothing changed, times kept


async def test_the_api_answers_a_conflict_as_a_kubernetes_status_with_causes(client):
    body = json.dumps(deployment(replicas=2))
    assert (await client.patch(f"{MD_PATH}/llama?fieldManager=alice", data=body, headers=APPLY)).status == 201
    denied = await client.patch(f"{MD_PATH}/llama?fieldManager=bob", data=json.dumps(deployment(replicas=3)),
                                headers=APPLY)
    status = await denied.json()
    assert denied.status == 409 and status["reason"] == "Conflict"
    assert status["details"]["causes"] == [{"reason": "FieldManagerConflict", "field": ".spec.replicas",
                                            "message": 'conflict with "alice" using exo.dev/v1alpha1'}]
    forced = await client.patch(f"{MD_PATH}/llama?fieldManager=bob&force=true",
                                data=json.dumps(deployment(replicas=3)), headers=APPLY)
    assert forced.status == 200 and (await forced.json())["spec"]["replicas"] == 3
    patched = await client.patch(f"{MD_PATH}/llama?fieldManager=ops", data='{"spec":{"replicas":4}}', headers=MERGE)
    entries = (await patched.json())["metadata"]["managedFields"]
    assert {(e["manager"], e["operation"]) for e in entries} >= {("bob", "Apply"), ("ops", "Update")}
    bad = await client.patch(f"{MD_PATH}/llama?fieldManager=bob&force=maybe", data=body, headers=APPLY)
    assert bad.status == 400 and "force" in (await bad.json())["message"]


async def test_a_status_write_keeps_the_managed_fields_of_the_object(client):
    body = json.dumps(deployment(replicas=2))
    applied = await (await client.patch(f"{MD_PATH}/llama?fieldManager=alice", data=body, headers=APPLY)).json()
    status = {"status": {"readyReplicas": 1}}
    answer = await client.patch(f"{MD_PATH}/llama/status", data=json.dumps(status), headers=MERGE)
    assert answer.status == 200
    assert (await answer.json())["metadata"]["managedFields"] == applied["metadata"]["managedFields"]
