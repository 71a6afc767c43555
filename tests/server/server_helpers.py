"""Manifests and headers shared by the API tests."""
from __future__ import annotations

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MD_PATH = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"
APPLY = {**AUTH, "Content-Type": "application/apply-patch+yaml"}


def deployment(name: str = "llama", *, labels: dict[str, str] | None = None, replicas: int = 1,
               namespace: str | None = None) -> dict:
    meta: dict = {"name": name, "labels": labels or {}}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": meta,
            "spec": {"model": {"source": "hf://org/model"}, "replicas": replicas}}


def node(name: str = "node-a") -> dict:
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "Node", "metadata": {"name": name},
            "spec": {"nodeId": "0f6c", "address": "127.0.0.1", "apiPort": 52415, "raftPort": 52416}}


def shard(name: str = "llama-0-0") -> dict:
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "Shard", "metadata": {"name": name},
            "spec": {"deployment": "default/llama", "replica": 0, "index": 0, "stages": 1,
                     "layers": {"start": 0, "end": 16}, "totalLayers": 16, "nodeName": "node-a",
                     "model": {"source": "hf://org/model"}}}
