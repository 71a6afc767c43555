"""Cordon from the real kubectl: ``kubectl cordon`` handles only core/v1 Nodes, so it refuses ours;
a merge patch of ``nodes.exo.dev`` sets ``spec.unschedulable``."""
from __future__ import annotations

from reconciler.store.base import make_command

NODE = {"apiVersion": "exo.dev/v1alpha1", "kind": "Node", "metadata": {"name": "node-b"},
        "spec": {"nodeId": "b", "address": "127.0.0.1", "apiPort": 1, "raftPort": 2}}


async def test_kubectl_patch_of_an_exo_node_cordons_it_and_kubectl_cordon_is_not_served(kube):
    await kube.store.submit(make_command("create", ("Node", "", "node-b"), body=NODE))
    await kube("patch", "nodes.exo.dev/node-b", "--type=merge", "-p", '{"spec":{"unschedulable":true}}')
    assert kube.store.get(("Node", "", "node-b"))["spec"]["unschedulable"] is True
    table = await kube("get", "nodes.exo.dev")
    assert table.stdout.splitlines()[1].split()[1] == "Unknown,SchedulingDisabled"
    refused = await kube("cordon", "node-b", check=False)
    # kubectl finds nodes.exo.dev but its cordon code knows only the core/v1 Node type.
    assert refused.code != 0 and 'no kind "Node" is registered for version "exo.dev/v1alpha1"' in refused.stderr
