"""The node's OpenAPI document describes exactly the routes of the node's app."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema_rs  # schemathesis's own validator
import schemathesis
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from exo_ctl.api.schema import schema_documents
from reconciler.config import NodeConfig
from reconciler.datapath.stage import StageServer
from reconciler.inference.backend import SamplingParams
from reconciler.inference.cluster import ClusterBackend
from reconciler.node import ExoNode
from reconciler.server.openapi import OPENAPI_PATH, OPERATIONS, app_routes, openapi_document, undescribed_routes
from reconciler.store.memory import MemoryStore


def node_app(tmp_path: Path):
    config = NodeConfig(name="node-a", data_dir=tmp_path, host="127.0.0.1", advertise_host="127.0.0.1",
                        api_port=52415, raft_port=52416, peers=(), secret="s3cret", node_id="id-a")
    store = MemoryStore()
    return ExoNode(config).build_http_app(store, stage_server=StageServer(), backend=ClusterBackend(store=store))


def test_every_route_of_the_node_is_described(tmp_path: Path) -> None:
    assert undescribed_routes(node_app(tmp_path)) == []


def test_every_described_operation_is_a_route_of_the_node(tmp_path: Path) -> None:
    assert sorted(OPERATIONS.keys() - app_routes(node_app(tmp_path))) == []


async def test_the_document_is_public_valid_openapi_with_bearer_security(tmp_path: Path) -> None:
    async with TestClient(TestServer(node_app(tmp_path), host="127.0.0.1")) as client:
        response = await client.get(OPENAPI_PATH)
        assert response.status == 200
        document = await response.json()
    assert document["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearer": []}]
    assert "security" not in document["paths"]["/healthz"]["get"]
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]  # raises on an invalid operation
    assert len(operations) == len(OPERATIONS)


def test_resource_bodies_use_the_same_schema_as_the_manifests(tmp_path: Path) -> None:
    manifest = json.loads(schema_documents()["modeldeployment.json"])
    components = openapi_document(node_app(tmp_path))["components"]["schemas"]
    assert set(manifest["properties"]) == set(components["ModelDeployment"]["properties"])
    assert components["Placement"]["properties"]["strategy"] == manifest["$defs"]["Placement"]["properties"]["strategy"]


def test_sampling_values_the_document_allows_are_exactly_those_the_data_path_accepts(tmp_path: Path) -> None:
    fields = openapi_document(node_app(tmp_path))["components"]["schemas"]["CompletionRequest"]["properties"]
    for name, values in {"temperature": [-0.5, 0, 0.7, 2, 2.5], "top_p": [-0.1, 0, 0.5, 1, 1.01],
                         "seed": [-2**63 - 1, -2**63, -1, 0, 2**64 - 1, 2**64]}.items():
        described = jsonschema_rs.validator_for(fields[name])
        for value in values:
            try:
                SamplingParams(**{name: value})
                accepted = True
            except ValidationError:
                accepted = False
            assert described.is_valid(value) == accepted, (name, value)
