"""The real exoctl program against a live API: get (tables, -o, -w), describe, delete and wait."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

from tests.cli.cli_helpers import deployment_yaml
from tests.cli.cli_helpers import COMMAND

READY = {"type": "Ready", "status": "True", "reason": "AllShardsReady", "message": "1/1 replicas ready",
         "lastTransitionTime": "2024-05-01T10:00:00Z"}


def _node(name: str, *, ready: str) -> dict:
    gib = 1024 ** 3
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "Node",
            "metadata": {"name": name},
            "spec": {"nodeId": "0f6c", "address": "127.0.0.1", "apiPort": 52415, "raftPort": 52416},
            "status": {"role": "leader", "capacity": {"memory": 16 * gib}, "allocatable": {"memory": 12 * gib}, "version": "0.1.0",
                       "conditions": [{"type": "Ready", "status": ready}]}}


def _shard() -> dict:
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "Shard", "metadata": {"name": "llama-0-1"},
            "spec": {"deployment": "default/llama", "replica": 0, "index": 1, "stages": 2,
                     "layers": {"start": 8, "end": 16}, "totalLayers": 16, "nodeName": "node-b",
                     "model": {"source": "hf://org/model"}},
            "status": {"phase": "Loading", "progress": 0.4}}


def test_get_prints_a_kubectl_table_with_ready_replicas_and_condition(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    api.set_status("ModelDeployment", "llama", {"readyReplicas": 1, "conditions": [READY]}, namespace="default")
    result = exoctl("get", "md")
    header, row = result.stdout.splitlines()
    assert header.split() == ["NAME", "MODEL", "REPLICAS", "READY", "AGE"]
    assert row.split()[:4] == ["llama", "hf://org/model", "1/1", "True"]
    assert row.split()[4].endswith("s")
    assert header.index("MODEL") == len("llama") + 2  # columns are separated by two spaces


def test_get_nodes_and_shards_show_status_memory_and_progress(api, exoctl):
    api.create(_node("node-a", ready="True"))
    api.create(_node("node-b", ready="False"))
    api.create(_shard())
    nodes = exoctl("get", "no").stdout.splitlines()
    shards = exoctl("get", "shards", "-o", "wide").stdout.splitlines()
    assert nodes[0].split() == ["NAME", "STATUS", "ROLE", "MEMORY", "ADDRESS", "AGE", "VERSION"]
    assert nodes[1].split()[:5] == ["node-a", "Ready", "leader", "12.0Gi/16.0Gi", "127.0.0.1"]
    assert nodes[2].split()[1] == "NotReady"
    assert shards[0].split()[:9] == ["NAME", "DEPLOYMENT", "REPLICA", "INDEX", "LAYERS", "NODE", "PHASE", "PROGRESS", "AGE"]
    assert shards[1].split()[:8] == ["llama-0-1", "default/llama", "0", "1", "8-15/16", "node-b", "Loading", "40%"]


def test_get_shards_shows_a_download_with_its_percent_rate_and_bytes(api, exoctl):
    api.create({**_shard(), "status": {"phase": "Downloading", "bytesDownloaded": 42 * 1024**2,
                                       "bytesToDownload": 100 * 1024**2, "downloadRate": 12.5 * 1024**2}})
    header, row = exoctl("get", "shards").stdout.splitlines()
    assert header.split() == ["DEPLOYMENT", "REPLICA", "INDEX", "LAYERS", "NODE", "PHASE", "PROGRESS", "AGE"]
    assert row.split()[5:8] == ["Downloading", "42%", "12.5MiB/s"]


def test_describe_node_lists_its_cached_models_with_sizes_and_what_each_holds(api, exoctl):
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 300))
    node = _node("node-a", ready="True")
    node["status"]["cachedModels"] = [
        {"name": "org-tiny-0123456789ab", "source": "hf://org/tiny", "revision": "main", "bytes": 3 * 1024**3,
         "complete": False, "parts": ["0-5", "embedding"], "lastUsed": now},
        {"name": "models-llama-ba9876543210", "source": "/models/llama", "bytes": 512 * 1024**2, "complete": True}]
    api.create(node)
    text = exoctl("describe", "node", "node-a").stdout
    section = text.split("Cached Models:  2, 3.5Gi on disk\n")[1].splitlines()
    assert section[0].split() == ["SOURCE", "REVISION", "SIZE", "HOLDS", "LAST", "USED"]
    assert section[1].split() == ["/models/llama", "<none>", "512.0Mi", "complete", "<none>"]
    assert section[2].split() == ["hf://org/tiny", "main", "3.0Gi", "0-5,", "embedding", "5m", "ago"]
    empty = _node("node-b", ready="True")
    empty["status"]["cachedModels"] = []
    api.create(empty)
    assert "Cached Models:  <none>\n" in exoctl("describe", "node", "node-b").stdout


def test_get_yaml_of_a_collection_is_a_list_and_of_one_name_is_the_object(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    listing = json.loads(exoctl("get", "modeldeployments", "-o", "json").stdout)
    single = json.loads(exoctl("get", "md", "llama", "-o", "json").stdout)
    assert listing["kind"] == "List" and [i["metadata"]["name"] for i in listing["items"]] == ["llama"]
    assert single["kind"] == "ModelDeployment"


def test_get_of_nothing_says_so_and_get_of_a_missing_name_fails(exoctl):
    empty = exoctl("get", "md")
    missing = exoctl("get", "md", "nope")
    assert (empty.code, empty.stdout, empty.stderr) == (0, "", "No resources found in default namespace.\n")
    assert missing.code == 1
    assert missing.stderr == 'Error from server (NotFound): modeldeployments.exo.dev "nope" not found\n'


def test_get_watch_prints_new_rows_and_ctrl_c_exits_130_quietly(api, exoctl_env, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    watcher = subprocess.Popen([*COMMAND, "get", "md", "-w"], env=exoctl_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().startswith("NAME")
        assert watcher.stdout.readline().split()[2] == "0/1"
        api.set_status("ModelDeployment", "llama", {"readyReplicas": 1, "conditions": [READY]}, namespace="default")
        assert watcher.stdout.readline().split()[2:4] == ["1/1", "True"]
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 130
        assert watcher.stderr.read() == ""
    finally:
        watcher.kill()
        watcher.wait()


def test_describe_shows_sections_conditions_and_hides_the_last_applied_annotation(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml(labels={"app": "demo"}))
    api.set_status("ModelDeployment", "llama", {"readyReplicas": 1, "conditions": [READY]}, namespace="default")
    text = exoctl("describe", "md", "llama").stdout
    assert "Name:         llama\n" in text and "Labels:       app=demo\n" in text
    assert "Annotations:  <none>\n" in text and "last-applied" not in text
    assert "    Source:  hf://org/model\n" in text and "  Ready Replicas:  1\n" in text
    conditions = text.split("Conditions:\n")[1].splitlines()
    assert conditions[0].split() == ["Type", "Status", "Reason", "Message", "LastTransitionTime"]
    assert conditions[1].split()[:3] == ["Ready", "True", "AllShardsReady"]


def test_describe_of_a_missing_object_is_not_found(exoctl):
    result = exoctl("describe", "no", "ghost")
    assert result.code == 1 and result.stderr == 'Error from server (NotFound): nodes.exo.dev "ghost" not found\n'


def test_delete_by_name_and_by_file_with_wait(api, exoctl, tmp_path):
    manifest = tmp_path / "two.yaml"
    manifest.write_text(deployment_yaml("a") + "---\n" + deployment_yaml("b"))
    exoctl("apply", "-f", str(manifest))
    by_name = exoctl("delete", "md", "a")
    by_file = exoctl("delete", "-f", str(manifest), "--wait", "--timeout=5s")
    assert by_name.stdout == 'modeldeployment.exo.dev "a" deleted\n'
    assert by_file.code == 1 and by_file.stdout == 'modeldeployment.exo.dev "b" deleted\n'
    assert by_file.stderr == 'Error from server (NotFound): modeldeployments.exo.dev "a" not found\n'
    assert not api.store.state.objects


def test_wait_returns_once_the_condition_holds(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    timer = threading.Timer(1.0, lambda: api.set_status(
        "ModelDeployment", "llama", {"conditions": [{**READY, "observedGeneration": 1}]}, namespace="default"))
    timer.start()
    started = time.monotonic()
    result = exoctl("wait", "md/llama", "--for=condition=Ready", "--timeout=20s")
    timer.join()
    assert (result.code, result.stdout) == (0, "modeldeployment.exo.dev/llama condition met\n"), result.stderr
    assert time.monotonic() - started < 15


def test_wait_times_out_with_kubectls_message(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml())
    result = exoctl("wait", "md", "llama", "--for=condition=Ready", "--timeout=1s")
    assert result.code == 1
    assert result.stderr == "error: timed out waiting for the condition on modeldeployments/llama\n"


def test_wait_for_delete_of_an_absent_object_succeeds_at_once(exoctl):
    result = exoctl("wait", "md/gone", "--for=delete", "--timeout=2s")
    assert (result.code, result.stdout) == (0, "modeldeployment.exo.dev/gone deleted\n")


def test_namespaces_separate_objects_and_all_namespaces_adds_a_column(api, exoctl):
    exoctl("apply", "-f", "-", input=deployment_yaml(namespace="dev") + "---\n" + deployment_yaml(namespace="prod"))
    dev = exoctl("get", "md", "-n", "dev", "-o", "name")
    everywhere = exoctl("get", "md", "--all-namespaces").stdout.splitlines()
    elsewhere = exoctl("get", "md", "-n", "test")
    assert dev.stdout == "modeldeployment.exo.dev/llama\n"
    assert [line.split()[:2] for line in everywhere] == [["NAMESPACE", "NAME"], ["dev", "llama"], ["prod", "llama"]]
    assert elsewhere.stderr == "No resources found in test namespace.\n"
