"""The Kubernetes client libraries talk to a node: the official client's dynamic client, lightkube
and kr8s, each through the kubeconfig from exo_ctl.kubeconfig."""
from __future__ import annotations

import asyncio

from kr8s.asyncio.objects import new_class

MD = {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
      "metadata": {"name": "tiny", "labels": {"app": "chat"}}, "spec": {"model": {"source": "hf://org/tiny"}}}


def _configuration(kube):
    from kubernetes import client, config
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kube.kubeconfig), client_configuration=configuration)
    return configuration


def dynamic_round_trip(kube) -> dict:
    from kubernetes import dynamic
    from kubernetes.client import api_client
    client = dynamic.DynamicClient(api_client.ApiClient(configuration=_configuration(kube)))
    api = client.resources.get(api_version="exo.dev/v1alpha1", kind="ModelDeployment")
    created = api.create(body=MD, namespace="default")
    listed = api.get(namespace="default")
    got = api.get(name="tiny", namespace="default")
    patched = api.patch(name="tiny", namespace="default", body={"spec": {"replicas": 2}},
                        content_type="application/merge-patch+json")
    events = [event["type"] for event in api.watch(namespace="default", timeout=2)]
    deleted = api.delete(name="tiny", namespace="default")
    return {"created": created.metadata.uid, "listed": [i.metadata.name for i in listed.items],
            "got": got.metadata.uid, "replicas": patched.spec.replicas, "events": events,
            "deleted": deleted.metadata.name}


async def test_the_kubernetes_dynamic_client_lists_gets_creates_patches_watches_and_deletes(kube):
    result = await asyncio.to_thread(dynamic_round_trip, kube)
    assert result["listed"] == ["tiny"] and result["got"] == result["created"]
    assert result["replicas"] == 2 and result["events"] == ["ADDED"] and result["deleted"] == "tiny"
    assert kube.store.get(("ModelDeployment", "default", "tiny")) is None


async def test_lightkube_connects_and_lists(kube):
    from lightkube import AsyncClient, KubeConfig
    from lightkube.generic_resource import create_namespaced_resource
    deployments = create_namespaced_resource("exo.dev", "v1alpha1", "ModelDeployment", "modeldeployments")
    client = AsyncClient(config=KubeConfig.from_file(str(kube.kubeconfig)))
    await client.create(deployments(MD), namespace="default")
    names = [obj.metadata.name async for obj in client.list(deployments, namespace="default")]
    patched = await client.patch(deployments, "tiny", {"spec": {"replicas": 3}}, namespace="default")  # strategic
    await client.close()
    assert names == ["tiny"] and patched.spec["replicas"] == 3


async def test_kr8s_connects_and_lists(kube):
    import kr8s.asyncio
    api = await kr8s.asyncio.api(kubeconfig=str(kube.kubeconfig))
    assert (await api.version())["gitVersion"].startswith("v1.32.0+exo")
    Deployment = new_class(kind="ModelDeployment", version="exo.dev/v1alpha1", namespaced=True)
    created = await Deployment(MD, api=api)
    await created.create()
    listed = [obj.name async for obj in api.get("modeldeployments.exo.dev", namespace="default")]
    assert listed == ["tiny"]
