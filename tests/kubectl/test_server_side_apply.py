"""kubectl's server-side apply against our managedFields: ownership, conflicts, --force-conflicts."""
from __future__ import annotations

import json

from tests.kubectl.test_kubectl_verbs import KEY, manifest


def owners(kube) -> dict[tuple[str, str], dict]:
    return {(e["manager"], e["operation"]): e["fieldsV1"] for e in kube.store.get(KEY)["metadata"]["managedFields"]}


async def test_two_field_managers_conflict_on_a_field_and_force_conflicts_takes_it(kube):
    await kube("apply", "--server-side", "--field-manager=alice", "-f", "-", stdin=manifest(replicas=2))
    assert owners(kube)[("alice", "Apply")]["f:spec"]["f:replicas"] == {}
    denied = await kube("apply", "--server-side", "--field-manager=bob", "-f", "-", stdin=manifest(replicas=3),
                        check=False)
    assert denied.code != 0
    assert 'conflict with "alice"' in denied.stderr and ".spec.replicas" in denied.stderr
    assert kube.store.get(KEY)["spec"]["replicas"] == 2
    await kube("apply", "--server-side", "--field-manager=bob", "--force-conflicts", "-f", "-",
               stdin=manifest(replicas=3))
    assert kube.store.get(KEY)["spec"]["replicas"] == 3
    fields = owners(kube)
    assert "f:replicas" in fields[("bob", "Apply")]["f:spec"]
    assert "f:replicas" not in fields[("alice", "Apply")]["f:spec"]


async def test_the_same_value_from_two_managers_is_shared_and_a_dropped_label_is_removed(kube):
    await kube("apply", "--server-side", "--field-manager=alice", "-f", "-",
               stdin=manifest(labels="{app: chat, team: a}"))
    await kube("apply", "--server-side", "--field-manager=bob", "-f", "-", stdin=manifest(labels="{app: chat}"))
    await kube("apply", "--server-side", "--field-manager=alice", "-f", "-", stdin=manifest(labels="{app: chat}"))
    assert kube.store.get(KEY)["metadata"]["labels"] == {"app": "chat"}
    await kube("apply", "--server-side", "--field-manager=alice", "-f", "-", stdin=manifest(labels="{}"))
    assert kube.store.get(KEY)["metadata"]["labels"] == {"app": "chat"}  # bob still applies it


async def test_a_patch_by_another_manager_takes_ownership_and_get_shows_managed_fields(kube):
    await kube("apply", "--server-side", "-f", "-", stdin=manifest(replicas=2))
    await kube("patch", "md", "tiny", "--type=merge", "-p", json.dumps({"spec": {"replicas": 4}}))
    fields = owners(kube)
    assert "f:replicas" in fields[("kubectl-patch", "Update")]["f:spec"]
    assert "f:replicas" not in fields[("kubectl", "Apply")]["f:spec"]
    shown = (await kube("get", "md", "tiny", "-o", "json", "--show-managed-fields")).json()
    assert {e["manager"] for e in shown["metadata"]["managedFields"]} == {"kubectl", "kubectl-patch"}
    again = await kube("apply", "--server-side", "-f", "-", stdin=manifest(replicas=2), check=False)
    assert again.code != 0 and 'conflict with "kubectl-patch"' in again.stderr
