"""The Kubernetes API conventions kubectl relies on: discovery, OpenAPI, Tables, field selectors,
pagination, resourceVersion rules, patch types and the scale subresource."""
from __future__ import annotations

import asyncio
import json

from exo_ctl.api.schema import schema_documents
from reconciler.server.discovery import AGGREGATED_V2
from tests.server.server_helpers import AUTH, MD_PATH, deployment, shard

TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
MERGE = {**AUTH, "Content-Type": "application/merge-patch+json"}
JSON_PATCH = {**AUTH, "Content-Type": "application/json-patch+json"}


async def test_apis_answers_the_aggregated_form_when_asked_and_the_legacy_list_otherwise(client):
    aggregated = await client.get("/apis", headers={**AUTH, "Accept": AGGREGATED_V2 + ",application/json"})
    assert "g=apidiscovery.k8s.io; v=v2; as=APIGroupDiscoveryList" in aggregated.headers["Content-Type"]
    (group,) = (await aggregated.json())["items"]
    resources = {r["resource"]: r for r in group["versions"][0]["resources"]}
    assert resources["modeldeployments"]["shortNames"] == ["md", "mds"]
    assert [s["subresource"] for s in resources["modeldeployments"]["subresources"]] == ["status", "scale"]
    legacy = await (await client.get("/apis", headers=AUTH)).json()
    assert legacy["kind"] == "APIGroupList" and legacy["groups"][0]["name"] == "exo.dev"
    listing = await (await client.get("/apis/exo.dev/v1alpha1", headers=AUTH)).json()
    assert {"modeldeployments", "modeldeployments/scale", "shards/status"} <= {r["name"] for r in listing["resources"]}


async def test_version_answers_with_and_without_a_trailing_slash(client):
    for path in ("/version", "/version/"):
        assert (await (await client.get(path)).json())["major"] == "1"


def _fields(schema: dict, definitions: dict, prefix: str = "") -> set[str]:
    """Every field path reachable in a schema, refs followed."""
    if "$ref" in schema:
        schema = definitions[schema["$ref"].rsplit("/", 1)[-1].removeprefix("dev.exo.v1alpha1.")]
    out = set()
    for name, sub in schema.get("properties", {}).items():
        out.add(prefix + name)
        out |= _fields(next((v for v in sub.get("anyOf", []) if "$ref" in v), sub), definitions, prefix + name + ".")
    return out


async def test_openapi_v3_has_every_field_of_the_manifest_schema(client):
    index = await (await client.get("/openapi/v3", headers=AUTH)).json()
    url = index["paths"]["apis/exo.dev/v1alpha1"]["serverRelativeURL"]
    document = await (await client.get(url, headers=AUTH)).json()
    schemas = {k.removeprefix("dev.exo.v1alpha1."): v for k, v in document["components"]["schemas"].items()}
    for file, kind in (("modeldeployment.json", "ModelDeployment"), ("shard.json", "Shard"), ("node.json", "Node")):
        manifest = json.loads(schema_documents()[file])
        assert _fields(schemas[kind], schemas) == _fields(manifest, manifest["$defs"]), kind
        assert schemas[kind]["x-kubernetes-group-version-kind"] == [
            {"group": "exo.dev", "kind": kind, "version": "v1alpha1"}]
    swagger = await (await client.get("/openapi/v2", headers=AUTH)).json()
    assert "dev.exo.v1alpha1.ModelDeployment" in swagger["definitions"]


async def test_a_table_list_has_the_printer_columns_and_wide_ones_at_priority_one(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment("a", replicas=2))
    response = await client.get(MD_PATH, headers={**AUTH, "Accept": TABLE})
    body = await response.json()
    assert body["kind"] == "Table"
    columns = [(c["name"], c["priority"]) for c in body["columnDefinitions"]]
    assert columns[:5] == [("Name", 0), ("Model", 0), ("Replicas", 0), ("Ready", 0), ("Age", 0)]
    assert ("Strategy", 1) in columns
    assert body["rows"][0]["cells"][:3] == ["a", "hf://org/model", "0/2"]
    assert body["rows"][0]["object"]["kind"] == "PartialObjectMetadata"


async def test_a_shard_table_shows_a_download_with_its_percent_and_rate(client):
    await client.post("/apis/exo.dev/v1alpha1/shards", headers=AUTH, json=shard("s0"))
    status = {"phase": "Downloading", "bytesDownloaded": 3 * 1024**2, "bytesToDownload": 4 * 1024**2,
              "downloadRate": 1.5 * 1024**2}
    patched = await client.patch("/apis/exo.dev/v1alpha1/shards/s0/status", headers=MERGE, json={"status": status})
    assert patched.status == 200, await patched.text()
    body = await (await client.get("/apis/exo.dev/v1alpha1/shards", headers={**AUTH, "Accept": TABLE})).json()
    names = [c["name"] for c in body["columnDefinitions"]]
    cells = dict(zip(names, body["rows"][0]["cells"]))
    assert (cells["Phase"], cells["Progress"]) == ("Downloading", "75% 1.5MiB/s")


async def test_field_selectors_filter_lists_by_name_and_refuse_unknown_fields(client):
    for name in ("a", "b"):
        await client.post(MD_PATH, headers=AUTH, json=deployment(name))
    got = await (await client.get(MD_PATH, headers=AUTH, params={"fieldSelector": "metadata.name=b"})).json()
    assert [i["metadata"]["name"] for i in got["items"]] == ["b"]
    others = await (await client.get(MD_PATH, headers=AUTH, params={"fieldSelector": "metadata.name!=b"})).json()
    assert [i["metadata"]["name"] for i in others["items"]] == ["a"]
    bad = await client.get(MD_PATH, headers=AUTH, params={"fieldSelector": "spec.replicas=1"})
    assert bad.status == 400 and "field label not supported" in (await bad.json())["message"]


async def test_shards_are_selected_by_node_name(client):
    await client.post("/apis/exo.dev/v1alpha1/shards", headers=AUTH, json=shard("s0"))
    elsewhere = {**shard("s1"), "spec": {**shard("s1")["spec"], "nodeName": "node-b"}}
    await client.post("/apis/exo.dev/v1alpha1/shards", headers=AUTH, json=elsewhere)
    got = await (await client.get("/apis/exo.dev/v1alpha1/shards", headers=AUTH,
                                  params={"fieldSelector": "spec.nodeName=node-b"})).json()
    assert [i["metadata"]["name"] for i in got["items"]] == ["s1"]


async def test_a_watch_with_a_field_selector_sees_only_that_object(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment("other"))
    watch = await client.get(MD_PATH, headers=AUTH, params={"watch": "true", "fieldSelector": "metadata.name=tiny",
                                                           "timeoutSeconds": "2"})
    await client.put(f"{MD_PATH}/other", headers=AUTH, json=deployment("other", replicas=3))
    await client.post(MD_PATH, headers=AUTH, json=deployment("tiny"))
    events = [json.loads(line) for line in (await watch.read()).splitlines()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "tiny")]


async def test_limit_and_continue_page_through_a_list(client):
    for name in ("a", "b", "c"):
        await client.post(MD_PATH, headers=AUTH, json=deployment(name))
    first = await (await client.get(MD_PATH, headers=AUTH, params={"limit": "2"})).json()
    assert [i["metadata"]["name"] for i in first["items"]] == ["a", "b"]
    assert first["metadata"]["remainingItemCount"] == 1
    rest = await (await client.get(MD_PATH, headers=AUTH, params={"limit": "2",
                                                                 "continue": first["metadata"]["continue"]})).json()
    assert [i["metadata"]["name"] for i in rest["items"]] == ["c"] and "continue" not in rest["metadata"]
    bad = await client.get(MD_PATH, headers=AUTH, params={"continue": "not-a-token"})
    assert bad.status == 400


async def test_list_resource_versions_newer_than_the_replica_are_504_and_exact_old_ones_410(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment("a"))
    assert (await client.get(MD_PATH, headers=AUTH, params={"resourceVersion": "0"})).status == 200
    assert (await client.get(MD_PATH, headers=AUTH, params={"resourceVersion": "1"})).status == 200
    too_new = await client.get(MD_PATH, headers=AUTH, params={"resourceVersion": "99"})
    assert too_new.status == 504 and "Too large resource version" in (await too_new.json())["message"]
    await client.post(MD_PATH, headers=AUTH, json=deployment("b"))
    exact = await client.get(MD_PATH, headers=AUTH, params={"resourceVersion": "1", "resourceVersionMatch": "Exact"})
    assert exact.status == 410


async def test_merge_and_json_patches_change_the_object_and_keep_the_rest(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment("a", labels={"app": "chat"}))
    merged = await client.patch(f"{MD_PATH}/a", headers=MERGE,
                                data=json.dumps({"metadata": {"labels": {"tier": "gpu"}}, "spec": {"replicas": 3}}))
    body = await merged.json()
    assert merged.status == 200 and body["spec"]["replicas"] == 3
    assert body["metadata"]["labels"] == {"app": "chat", "tier": "gpu"} and body["metadata"]["generation"] == 2
    removed = await client.patch(f"{MD_PATH}/a", headers=MERGE, data=json.dumps({"metadata": {"labels": {"app": None}}}))
    assert (await removed.json())["metadata"]["labels"] == {"tier": "gpu"}
    patched = await client.patch(f"{MD_PATH}/a", headers=JSON_PATCH, data=json.dumps(
        [{"op": "test", "path": "/spec/replicas", "value": 3}, {"op": "replace", "path": "/spec/replicas", "value": 1}]))
    assert (await patched.json())["spec"]["replicas"] == 1
    failed = await client.patch(f"{MD_PATH}/a", headers=JSON_PATCH, data=json.dumps(
        [{"op": "test", "path": "/spec/replicas", "value": 9}]))
    assert failed.status == 422


async def test_a_patch_with_a_stale_resource_version_is_409_and_an_invalid_result_422(client):
    created = await (await client.post(MD_PATH, headers=AUTH, json=deployment("a"))).json()
    await client.patch(f"{MD_PATH}/a", headers=MERGE, data=json.dumps({"spec": {"replicas": 2}}))
    stale = await client.patch(f"{MD_PATH}/a", headers=MERGE, data=json.dumps(
        {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "spec": {"replicas": 5}}))
    assert stale.status == 409
    invalid = await client.patch(f"{MD_PATH}/a", headers=MERGE, data=json.dumps({"spec": {"placement": {"strategy": "x"}}}))
    assert invalid.status == 422 and "spec.placement.strategy" in (await invalid.json())["message"]
    missing = await client.patch(f"{MD_PATH}/nope", headers=MERGE, data="{}")
    assert missing.status == 404


async def test_concurrent_merge_patches_all_apply(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment("a"))
    await asyncio.gather(*(client.patch(f"{MD_PATH}/a", headers=MERGE, data=json.dumps(
        {"metadata": {"labels": {f"k{i}": "v"}}})) for i in range(3)))
    labels = (await (await client.get(f"{MD_PATH}/a", headers=AUTH)).json())["metadata"]["labels"]
    assert set(labels) == {"k0", "k1", "k2"}


async def test_the_scale_subresource_reads_and_sets_replicas(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment("a"))
    scale = await (await client.get(f"{MD_PATH}/a/scale", headers=AUTH)).json()
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 1
    scaled = await client.patch(f"{MD_PATH}/a/scale", headers=MERGE, data=json.dumps({"spec": {"replicas": 4}}))
    assert (await scaled.json())["spec"]["replicas"] == 4
    negative = await client.patch(f"{MD_PATH}/a/scale", headers=MERGE, data=json.dumps({"spec": {"replicas": -2}}))
    assert negative.status == 422 and "spec.replicas" in (await negative.json())["message"]


async def test_a_status_patch_changes_only_the_status(client):
    await client.post(MD_PATH, headers=AUTH, json=deployment("a"))
    response = await client.patch(f"{MD_PATH}/a/status", headers=MERGE,
                                  data=json.dumps({"status": {"readyReplicas": 1}, "spec": {"replicas": 9}}))
    body = await response.json()
    assert response.status == 200 and body["status"]["readyReplicas"] == 1 and body["spec"]["replicas"] == 1
