"""CRUD, apply, preconditions, validation and store failures through the HTTP API."""
import json

import pytest
import yaml

from tests.server.server_helpers import APPLY, AUTH, MD_PATH, deployment, node, shard

NODES = "/apis/exo.dev/v1alpha1/nodes"
SHARDS = "/apis/exo.dev/v1alpha1/shards"


async def test_create_get_list_and_delete_a_deployment(client, store):
    created = await client.post(MD_PATH, headers=AUTH, json=deployment())
    assert created.status == 201
    body = await created.json()
    assert body["metadata"]["namespace"] == "default"
    assert body["metadata"]["resourceVersion"] == "1" and body["metadata"]["generation"] == 1

    got = await client.get(f"{MD_PATH}/llama", headers=AUTH)
    assert (await got.json())["metadata"]["uid"] == body["metadata"]["uid"]

    listed = await (await client.get(MD_PATH, headers=AUTH)).json()
    assert listed["kind"] == "ModelDeploymentList" and listed["metadata"]["resourceVersion"] == "1"
    assert [item["metadata"]["name"] for item in listed["items"]] == ["llama"]

    deleted = await client.delete(f"{MD_PATH}/llama", headers=AUTH)
    assert deleted.status == 200
    assert (await deleted.json())["metadata"]["deletionTimestamp"]
    missing = await client.get(f"{MD_PATH}/llama", headers=AUTH)
    assert missing.status == 404
    assert (await missing.json())["reason"] == "NotFound"
    assert (await client.delete(f"{MD_PATH}/llama", headers=AUTH)).status == 404


async def test_creating_an_existing_deployment_is_409_already_exists(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment())
    again = await client.post(MD_PATH, headers=AUTH, json=deployment())
    assert again.status == 409
    assert (await again.json())["reason"] == "AlreadyExists"


async def test_list_across_namespaces_and_within_one(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment("a"))
    await client.post("/apis/exo.dev/v1alpha1/namespaces/team/modeldeployments", headers=AUTH, json=deployment("b"))
    everywhere = await (await client.get("/apis/exo.dev/v1alpha1/modeldeployments", headers=AUTH)).json()
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in everywhere["items"]] == [("default", "a"), ("team", "b")]
    team = await (await client.get("/apis/exo.dev/v1alpha1/namespaces/team/modeldeployments", headers=AUTH)).json()
    assert [i["metadata"]["name"] for i in team["items"]] == ["b"]


async def test_list_filters_by_label_selector(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment("a", labels={"tier": "gpu", "env": "prod"}))
    await client.post(MD_PATH, headers=AUTH, json=deployment("b", labels={"tier": "cpu"}))
    await client.post(MD_PATH, headers=AUTH, json=deployment("c"))

    async def names(selector: str) -> list[str]:
        response = await client.get(MD_PATH, headers=AUTH, params={"labelSelector": selector})
        assert response.status == 200
        return [i["metadata"]["name"] for i in (await response.json())["items"]]

    assert await names("tier=gpu") == ["a"]
    assert await names("tier!=gpu") == ["b", "c"]
    assert await names("tier in (gpu,cpu),!env") == ["b"]
    assert await names("!tier") == ["c"]


async def test_bad_label_selector_is_a_400_naming_the_parameter(client):
    response = await client.get(MD_PATH, headers=AUTH, params={"labelSelector": "tier in gpu"})
    assert response.status == 400
    assert "labelSelector" in (await response.json())["message"]


async def test_apply_reports_created_then_unchanged_then_configured(client, store):
    manifest = yaml.safe_dump(deployment(labels={"app": "llama"}))
    first = await client.patch(f"{MD_PATH}/llama", headers=APPLY, data=manifest)
    assert first.status == 201 and first.headers["X-Exo-Apply-Result"] == "created"

    second = await client.patch(f"{MD_PATH}/llama", headers=APPLY, data=manifest)
    assert second.status == 200 and second.headers["X-Exo-Apply-Result"] == "unchanged"
    assert store.revision == 1

    changed = yaml.safe_dump(deployment(labels={"app": "llama"}, replicas=2))
    third = await client.patch(f"{MD_PATH}/llama", headers=APPLY, data=changed)
    assert third.status == 200 and third.headers["X-Exo-Apply-Result"] == "configured"
    body = await third.json()
    assert body["spec"]["replicas"] == 2 and body["metadata"]["generation"] == 2
    assert store.revision == 2


async def test_apply_accepts_a_json_manifest_and_fills_the_name_from_the_url(client):
    manifest = deployment()
    del manifest["metadata"]["name"]
    response = await client.patch(f"{MD_PATH}/from-url", headers=APPLY, data=json.dumps(manifest))
    assert response.status == 201
    assert (await response.json())["metadata"]["name"] == "from-url"


async def test_a_patch_of_an_unknown_media_type_is_415_naming_the_supported_ones(client):
    response = await client.patch(f"{MD_PATH}/llama", headers={**AUTH, "Content-Type": "text/plain"},
                                  data=json.dumps(deployment()))
    assert response.status == 415
    assert "application/merge-patch+json" in (await response.json())["message"]


async def test_replace_with_stale_resource_version_is_409_conflict(client):
    created = await (await client.post(MD_PATH, headers=AUTH, json=deployment())).json()
    fresh = {**deployment(replicas=3), "metadata": {"name": "llama", "resourceVersion": created["metadata"]["resourceVersion"]}}
    replaced = await client.put(f"{MD_PATH}/llama", headers=AUTH, json=fresh)
    assert replaced.status == 200
    assert (await replaced.json())["spec"]["replicas"] == 3

    stale = await client.put(f"{MD_PATH}/llama", headers=AUTH, json={**fresh, "spec": {**fresh["spec"], "replicas": 4}})
    assert stale.status == 409
    assert (await stale.json())["reason"] == "Conflict"


async def test_replace_of_a_missing_object_is_404(client):
    response = await client.put(f"{MD_PATH}/ghost", headers=AUTH, json=deployment("ghost"))
    assert response.status == 404


async def test_invalid_object_is_422_with_field_path_causes(client, store):
    bad = deployment()
    bad["spec"]["placement"] = {"strategy": "pack"}
    bad["spec"]["replicas"] = -1
    response = await client.post(MD_PATH, headers=AUTH, json=bad)
    assert response.status == 422
    body = await response.json()
    assert body["reason"] == "Invalid" and body["details"]["kind"] == "ModelDeployment"
    fields = {cause["field"] for cause in body["details"]["causes"]}
    assert fields == {"spec.placement.strategy", "spec.replicas"}
    assert store.revision == 0


async def test_bad_yaml_is_400_naming_the_line(client):
    manifest = "apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: [llama\nspec: {}\n"
    response = await client.patch(f"{MD_PATH}/llama", headers=APPLY, data=manifest)
    assert response.status == 400
    assert "line 5" in (await response.json())["message"]


async def test_bad_json_is_400_naming_the_line(client):
    response = await client.post(MD_PATH, headers={**AUTH, "Content-Type": "application/json"},
                                 data='{\n  "kind": "ModelDeployment",\n  "metadata": }')
    assert response.status == 400
    assert "line 3" in (await response.json())["message"]


async def test_body_over_one_mebibyte_is_413(client, store):
    big = deployment()
    big["metadata"]["annotations"] = {"filler": "x" * (1024 * 1024)}
    response = await client.post(MD_PATH, headers=AUTH, json=big)
    assert response.status == 413
    assert (await response.json())["kind"] == "Status"
    assert store.revision == 0


async def test_namespace_in_body_must_match_the_url(client, store):
    response = await client.post(MD_PATH, headers=AUTH, json=deployment(namespace="other"))
    assert response.status == 400
    assert "namespace" in (await response.json())["message"]
    assert store.revision == 0


async def test_name_in_body_must_match_the_url_on_replace(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment())
    response = await client.put(f"{MD_PATH}/llama", headers=AUTH, json=deployment("other"))
    assert response.status == 400


async def test_kind_in_body_must_match_the_url(client):
    response = await client.post(MD_PATH, headers=AUTH, json=node())
    assert response.status == 400
    assert "does not match the URL" in (await response.json())["message"]


@pytest.mark.parametrize("method, path, body", [
    ("post", MD_PATH, b"[1, 2]"),
    ("post", MD_PATH, b"\xff\xfe"),
    ("post", MD_PATH, b""),
    ("post", MD_PATH, b"[" * 100_000),
    ("post", MD_PATH, b'{"kind": "ModelDeployment", "metadata": "llama"}'),
    ("post", MD_PATH, b'{"apiVersion": "v2", "kind": "ModelDeployment", "metadata": {"name": "x"}}'),
    ("put", f"{MD_PATH}/llama", b'{"metadata": {"name": 3}}'),
    ("put", f"{MD_PATH}/llama/status", b'{"status": "ready"}'),
    ("put", f"{MD_PATH}/llama/status", b'{"metadata": [], "status": {}}'),
    ("put", f"{MD_PATH}/llama/status", b'{"metadata": null, "kind": "Node", "status": {}}'),
    ("put", f"{MD_PATH}/llama", b'{"metadata": null, "kind": "ModelDeployment"}'),
    ("delete", f"{MD_PATH}/llama", b'{"preconditions": {"resourceVersion": 3, "extra": 1}}'),
    ("delete", f"{MD_PATH}/llama", b'"everything"'),
    ("get", f"{MD_PATH}?watch=maybe", b""),
    ("get", f"{MD_PATH}?watch=1&resourceVersion=abc", b""),
    ("post", f"{MD_PATH}?dryRun=Some", b"{}"),
    ("post", MD_PATH, b'{"kind": "ModelDeployment", "extra": ' + b"[" * 900 + b"]" * 900 + b"}"),
    ("post", MD_PATH, b'{"kind": "ModelDeployment", "metadata": {"name": "x", "labels": ' + b"[" * 900 + b"]" * 900 + b"}}"),
    ("patch", f"{MD_PATH}/llama", b"kind: ModelDeployment\nspec: " + b"[" * 1500 + b"]" * 1500),
])
async def test_bad_input_gets_a_4xx_status_never_a_500(client, store, method, path, body):
    await client.post(MD_PATH, headers=AUTH, json=deployment())
    content_type = "application/apply-patch+yaml" if method == "patch" else "application/json"
    response = await getattr(client, method)(path, headers={**AUTH, "Content-Type": content_type}, data=body)
    assert 400 <= response.status < 500
    assert (await response.json())["kind"] == "Status"


async def test_yaml_aliases_are_refused(client):
    manifest = "a: &x [1, 2]\nb: *x\n"
    response = await client.patch(f"{MD_PATH}/llama", headers=APPLY, data=manifest)
    assert response.status == 400
    assert "aliases" in (await response.json())["message"]


async def test_server_set_metadata_in_a_body_is_ignored(client):
    manifest = deployment()
    manifest["metadata"].update(uid="forged", generation=99, creationTimestamp="2001-01-01T00:00:00Z")
    body = await (await client.post(MD_PATH, headers=AUTH, json=manifest)).json()
    assert body["metadata"]["uid"] != "forged" and body["metadata"]["generation"] == 1
    assert body["metadata"]["creationTimestamp"] != "2001-01-01T00:00:00Z"


async def test_dry_run_commits_nothing_but_answers_as_a_real_write(client, store):
    created = await client.post(f"{MD_PATH}?dryRun=All", headers=AUTH, json=deployment())
    assert created.status == 201
    assert (await created.json())["metadata"]["name"] == "llama"
    applied = await client.patch(f"{MD_PATH}/llama?dryRun=All", headers=APPLY, data=yaml.safe_dump(deployment()))
    assert applied.status == 201 and applied.headers["X-Exo-Apply-Result"] == "created"
    assert store.revision == 0 and store.commands == []

    await client.post(MD_PATH, headers=AUTH, json=deployment())
    deleted = await client.delete(f"{MD_PATH}/llama?dryRun=All", headers=AUTH)
    assert deleted.status == 200
    replaced = await client.put(f"{MD_PATH}/llama?dryRun=All", headers=AUTH, json=deployment(replicas=5))
    assert (await replaced.json())["spec"]["replicas"] == 5
    assert store.revision == 1
    assert (await (await client.get(f"{MD_PATH}/llama", headers=AUTH)).json())["spec"]["replicas"] == 1


async def test_dry_run_reports_the_same_errors_as_a_real_write(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment())
    response = await client.post(f"{MD_PATH}?dryRun=All", headers=AUTH, json=deployment())
    assert response.status == 409


async def test_write_without_quorum_is_503_with_retry_after(client, store):
    store.quorum = False
    response = await client.post(MD_PATH, headers=AUTH, json=deployment())
    assert response.status == 503
    assert int(response.headers["Retry-After"]) > 0
    assert (await response.json())["reason"] == "ServiceUnavailable"


async def test_unconfirmed_commit_with_quorum_is_504_naming_the_op_id(client, store, monkeypatch):
    from reconciler.store.base import StoreUnavailable

    async def times_out(command, *, timeout):
        raise StoreUnavailable("commit timed out")

    monkeypatch.setattr(store, "_commit", times_out)
    response = await client.post(MD_PATH, headers={**AUTH, "X-Exo-Op-Id": "op-123"}, json=deployment())
    assert response.status == 504
    assert response.headers["X-Exo-Op-Id"] == "op-123"


async def test_retrying_a_write_with_the_same_op_id_applies_it_once(client, store):
    headers = {**AUTH, "X-Exo-Op-Id": "create-llama-1"}
    first = await client.post(MD_PATH, headers=headers, json=deployment())
    retry = await client.post(MD_PATH, headers=headers, json=deployment())
    assert first.status == retry.status == 201
    assert store.revision == 1


async def test_nodes_and_shards_live_at_cluster_scoped_paths(client):
    assert (await client.post(NODES, headers=AUTH, json=node())).status == 201
    assert (await client.post(SHARDS, headers=AUTH, json=shard())).status == 201
    got = await (await client.get(f"{NODES}/node-a", headers=AUTH)).json()
    assert "namespace" not in got["metadata"]
    assert [i["metadata"]["name"] for i in (await (await client.get(SHARDS, headers=AUTH)).json())["items"]] == ["llama-0-0"]
    namespaced = {**node("node-b"), "metadata": {"name": "node-b", "namespace": "default"}}
    refused = await client.post(NODES, headers=AUTH, json=namespaced)
    assert refused.status == 422
    assert refused and (await refused.json())["details"]["causes"][0]["field"] == "metadata.namespace"


async def test_status_subresource_writes_status_without_bumping_generation(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment())
    response = await client.put(f"{MD_PATH}/llama/status", headers=AUTH,
                                json={"status": {"readyReplicas": 1, "observedGeneration": 1}})
    assert response.status == 200
    body = await response.json()
    assert body["status"]["readyReplicas"] == 1
    assert body["metadata"]["generation"] == 1 and body["metadata"]["resourceVersion"] == "2"
    assert body["spec"]["replicas"] == 1


async def test_status_in_a_user_manifest_is_ignored(client):
    manifest = {**deployment(), "status": {"readyReplicas": 7}}
    body = await (await client.post(MD_PATH, headers=AUTH, json=manifest)).json()
    assert "status" not in body


async def test_invalid_status_is_422_naming_the_status_field(client):
    await client.post(f"{SHARDS}", headers=AUTH, json=shard())
    response = await client.put(f"{SHARDS}/llama-0-0/status", headers=AUTH, json={"status": {"phase": "Dancing"}})
    assert response.status == 422
    assert (await response.json())["details"]["causes"][0]["field"] == "status.phase"


async def test_status_with_stale_resource_version_is_409(client):
    await client.post(SHARDS, headers=AUTH, json=shard())
    ok = await client.put(f"{SHARDS}/llama-0-0/status", headers=AUTH,
                          json={"metadata": {"resourceVersion": "1"}, "status": {"phase": "Loading"}})
    assert ok.status == 200
    stale = await client.put(f"{SHARDS}/llama-0-0/status", headers=AUTH,
                             json={"metadata": {"resourceVersion": "1"}, "status": {"phase": "Ready"}})
    assert stale.status == 409


async def test_status_of_a_missing_object_is_404(client):
    response = await client.put(f"{SHARDS}/ghost/status", headers=AUTH, json={"status": {"phase": "Ready"}})
    assert response.status == 404


async def test_delete_checks_resource_version_and_uid_preconditions(client):
    created = await (await client.post(MD_PATH, headers=AUTH, json=deployment())).json()
    stale = await client.delete(f"{MD_PATH}/llama", headers=AUTH, json={"preconditions": {"resourceVersion": "0"}})
    assert stale.status == 409
    wrong_uid = await client.delete(f"{MD_PATH}/llama", headers=AUTH, json={"preconditions": {"uid": "nope"}})
    assert wrong_uid.status == 409
    ok = await client.delete(f"{MD_PATH}/llama", headers=AUTH, json={
        "preconditions": {"resourceVersion": created["metadata"]["resourceVersion"], "uid": created["metadata"]["uid"]}})
    assert ok.status == 200


async def test_chunked_body_over_one_mebibyte_is_413(client, store):
    headers = {**AUTH, "Content-Type": "application/json"}
    response = await client.post(MD_PATH, headers=headers, data=b" " * (1024 * 1024 + 1), chunked=True)
    assert response.status == 413
    assert "Content-Length" not in response.request_info.headers
    assert store.revision == 0
