"""A kubeconfig for one node (server, token, CA), so kubectl and the Kubernetes client libraries
reach the cluster: ``exoctl config kubeconfig > exo.kubeconfig; KUBECONFIG=exo.kubeconfig kubectl get md``."""
from __future__ import annotations

import base64
from typing import Any

CONTEXT = "exo"


def kubeconfig(*, server: str, token: str, ca_pem: bytes | None, namespace: str = "default",
               name: str = CONTEXT) -> dict[str, Any]:
    """kubectl sends a token only over TLS: an ``http://`` server gets a kubeconfig that works
    for discovery only, so callers warn about it."""
    cluster: dict[str, Any] = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    return {
        "apiVersion": "v1", "kind": "Config", "preferences": {}, "current-context": name,
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}],
    }
