"""The real kubectl binary drives every verb against a node's API served over HTTPS."""
from __future__ import annotations

import asyncio
import json
import os
import sys

from reconciler.server.events import write_event
from tests.kubectl.conftest import TOKEN
from reconciler.store.base import make_command

KEY = ("ModelDeployment", "default", "tiny")


def manifest(name: str = "tiny", *, replicas: int = 1, labels: str = "{app: chat}") -> str:
    return (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\n  labels: {labels}\n"
            f"spec:\n  model: {{source: hf://org/tiny}}\n  replicas: {replicas}\n")


async def ready(kube, name: str) -> None:
    condition = {"type": "Ready", "status": "True", "reason": "Serving", "message": "all shards ready"}
    await kube.store.submit(make_command("status", ("ModelDeployment", "default", name),
                                         body={"status": {"readyReplicas": 1, "conditions": [condition]}}))


async def test_client_side_apply_creates_then_configures_and_diff_shows_the_change(kube):
    assert "created" in (await kube("apply", "-f", "-", stdin=manifest())).stdout
    diff = await kube("diff", "-f", "-", stdin=manifest(replicas=3), check=False)
    assert diff.code == 1 and "+  replicas: 3" in diff.stdout
    assert (await kube("diff", "-f", "-", stdin=manifest(), check=False)).code == 0
    assert "configured" in (await kube("apply", "-f", "-", stdin=manifest(replicas=3))).stdout
    assert kube.store.get(KEY)["spec"]["replicas"] == 3


async def test_server_side_apply_creates_and_reapplies(kube):
    assert "serverside-applied" in (await kube("apply", "--server-side", "-f", "-", stdin=manifest())).stdout
    await kube("apply", "--server-side", "-f", "-", stdin=manifest(replicas=2))
    assert kube.store.get(KEY)["spec"]["replicas"] == 2


async def test_get_prints_our_printer_columns_in_every_output_form(kube):
    await kube("apply", "-f", "-", stdin=manifest())
    await ready(kube, "tiny")
    table = (await kube("get", "md")).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODEL", "REPLICAS", "READY", "AGE"]
    assert table[1].split()[:4] == ["tiny", "hf://org/tiny", "1/1", "True"]
    assert "STRATEGY" in (await kube("get", "modeldeployments.exo.dev", "-o", "wide")).stdout.splitlines()[0]
    assert (await kube("get", "md", "tiny", "-o", "json")).json()["spec"]["replicas"] == 1
    assert "source: hf://org/tiny" in (await kube("get", "md", "tiny", "-o", "yaml")).stdout
    assert (await kube("get", "md", "-o", "jsonpath={.items[0].status.conditions[0].status}")).stdout == "True"
    columns = await kube("get", "md", "-o", "custom-columns=N:.metadata.name,R:.spec.replicas")
    assert columns.stdout.splitlines()[1].split() == ["tiny", "1"]
    assert (await kube("get", "shards")).stderr.strip() == "No resources found"
    assert (await kube("get", "nodes.exo.dev")).stderr.strip() == "No resources found"


async def test_wait_for_ready_waits_for_the_named_object_only(kube):
    await kube("apply", "-f", "-", stdin=manifest())
    await kube("apply", "-f", "-", stdin=manifest("other"))
    await ready(kube, "tiny")
    waited = await kube("wait", "--for=condition=Ready", "md/other", "--timeout=2s", check=False)
    assert waited.code != 0 and "timed out" in waited.stderr
    waiter = asyncio.ensure_future(kube("wait", "--for=condition=Ready", "md/other", "--timeout=20s"))
    await asyncio.sleep(1.0)
    await ready(kube, "other")
    assert "condition met" in (await waiter).stdout


async def test_label_annotate_patch_and_scale_change_the_stored_object(kube):
    await kube("apply", "-f", "-", stdin=manifest())
    await kube("label", "md", "tiny", "tier=gpu")
    await kube("annotate", "md", "tiny", "note=hello")
    await kube("patch", "md", "tiny", "--type=merge", "-p", json.dumps({"spec": {"replicas": 3}}))
    obj = kube.store.get(KEY)
    assert obj["metadata"]["labels"] == {"app": "chat", "tier": "gpu"}
    assert obj["metadata"]["annotations"]["note"] == "hello" and obj["spec"]["replicas"] == 3
    await kube("patch", "md", "tiny", "--type=json", "-p",
               json.dumps([{"op": "replace", "path": "/spec/placement/strategy", "value": "Spread"}]))
    assert kube.store.get(KEY)["spec"]["placement"]["strategy"] == "Spread"
    assert "scaled" in (await kube("scale", "md/tiny", "--replicas=5")).stdout
    assert kube.store.get(KEY)["spec"]["replicas"] == 5
    bad = await kube("patch", "md", "tiny", "--type=merge", "-p", '{"spec":{"replicas":-1}}', check=False)
    assert bad.code != 0 and "spec.replicas" in bad.stderr


async def test_edit_saves_what_the_editor_wrote(kube, tmp_path):
    await kube("apply", "-f", "-", stdin=manifest())
    editor = tmp_path / "editor.sh"
    editor.write_text("#!/bin/sh\nsed -i 's/replicas: 1/replicas: 7/' \"$1\"\n")
    editor.chmod(0o755)
    assert "edited" in (await kube("edit", "md/tiny", env={"KUBE_EDITOR": str(editor)})).stdout
    assert kube.store.get(KEY)["spec"]["replicas"] == 7


async def test_describe_shows_spec_and_status(kube):
    await kube("apply", "-f", "-", stdin=manifest())
    await ready(kube, "tiny")
    described = (await kube("describe", "md", "tiny")).stdout
    assert "Source:  hf://org/tiny" in described and "Ready" in described


async def test_delete_removes_the_object(kube):
    await kube("apply", "-f", "-", stdin=manifest())
    assert "deleted" in (await kube("delete", "md", "tiny")).stdout
    assert kube.store.get(KEY) is None
    missing = await kube("get", "md", "tiny", check=False)
    assert missing.code != 0 and 'modeldeployments.exo.dev "tiny" not found' in missing.stderr


async def test_get_watch_prints_changes_as_table_rows(kube):
    await kube("apply", "-f", "-", stdin=manifest())
    watcher = asyncio.ensure_future(kube("get", "md", "-w", "--request-timeout=3s", check=False))
    await asyncio.sleep(1.0)
    await ready(kube, "tiny")
    lines = (await watcher).stdout.splitlines()
    assert lines[0].split()[0] == "NAME" and sum(line.startswith("NAME") for line in lines) == 1
    assert lines[-1].split()[:4] == ["tiny", "hf://org/tiny", "1/1", "True"]


async def test_dry_run_server_commits_nothing(kube):
    await kube("apply", "-f", "-", stdin=manifest())
    assert "server dry run" in (await kube("apply", "--dry-run=server", "-f", "-", stdin=manifest(replicas=4))).stdout
    assert kube.store.get(KEY)["spec"]["replicas"] == 1


async def test_get_events_and_describe_show_what_the_controllers_recorded(kube):
    await kube("apply", "-f", "-", stdin=manifest())
    await write_event(kube.store, kube.store.get(KEY), reason="Unschedulable", type_="Warning",
                      message="no node has 9Gi free", component="scheduler")
    events = (await kube("get", "events")).stdout.splitlines()
    assert events[0].split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert events[1].split()[1:5] == ["Warning", "Unschedulable", "modeldeployment/tiny", "no"]
    described = (await kube("describe", "md", "tiny")).stdout
    assert "Unschedulable" in described.split("Events:")[1] and "no node has 9Gi free" in described


async def test_a_gitops_folder_applied_with_prune_by_kubectl_and_by_exoctl_ends_in_the_same_state(kube, tmp_path):
    folder = tmp_path / "deploy"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.yaml").write_text(manifest(name, labels="{app: chat}"))
    await kube("apply", "-f", "-", stdin=manifest("stray", labels="{app: chat}"))
    await kube("apply", "-f", "-", stdin=manifest("unrelated", labels="{app: other}"))
    prune = ("--prune", "-l", "app=chat", "--prune-allowlist=exo.dev/v1alpha1/ModelDeployment")
    out = (await kube("apply", "-f", str(folder), *prune)).stdout
    assert "modeldeployment.exo.dev/stray pruned" in out
    by_kubectl = sorted(k[2] for k in kube.store.state.objects if k[0] == "ModelDeployment")
    (folder / "b.yaml").unlink()
    (folder / "c.yaml").write_text(manifest("c", labels="{app: chat}"))
    exoctl = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exo_ctl.cli.main", "--server", kube.server, "--token", TOKEN,
        "apply", "-f", str(folder), "--prune", "-l", "app=chat", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "EXOCTL_CA": str(kube.ca_file),
                                            "XDG_CONFIG_HOME": str(tmp_path)})
    out, err = await exoctl.communicate()
    assert exoctl.returncode == 0, err.decode()
    by_exoctl = sorted(k[2] for k in kube.store.state.objects if k[0] == "ModelDeployment")
    assert by_kubectl == ["a", "b", "unrelated"] and by_exoctl == ["a", "c", "unrelated"]
    specs = {k: v["spec"] for k, v in kube.store.state.objects.items() if k[0] == "ModelDeployment"}
    again = (await kube("apply", "-f", str(folder), *prune)).stdout  # kubectl adds only its annotation to c
    assert "pruned" not in again and "created" not in again
    assert {k: v["spec"] for k, v in kube.store.state.objects.items() if k[0] == "ModelDeployment"} == specs
