"""The real exoctl program against a live API: cordon, uncordon and drain (a PATCH of the Node's
spec.unschedulable; drain then follows the Shards until none is left on the node)."""
from __future__ import annotations

import threading
import time

from tests.cli.cli_helpers import deployment_yaml
from tests.cli.test_exoctl_read import READY, _node as _read_node, _shard


def _node(name: str, *, ready: str, port: int) -> dict:
    """A Node whose API is the test server (drain asks it which shards it still holds)."""
    body = _read_node(name, ready=ready)
    return {**body, "spec": {**body["spec"], "apiPort": port}}


def test_cordon_sets_unschedulable_and_get_nodes_shows_scheduling_disabled(api, exoctl):
    api.create(_node("node-a", ready="True", port=int(api.url.rsplit(":", 1)[1])))
    result = exoctl("cordon", "node-a")
    assert result.code == 0 and result.stdout.strip() == "node.exo.dev/node-a cordoned"
    assert api.get("Node", "node-a")["spec"]["unschedulable"] is True
    assert exoctl("get", "nodes").stdout.splitlines()[1].split()[1] == "Ready,SchedulingDisabled"
    assert exoctl("cordon", "node-a").stdout.strip() == "node.exo.dev/node-a already cordoned"
    assert exoctl("uncordon", "node-a").stdout.strip() == "node.exo.dev/node-a uncordoned"
    assert api.get("Node", "node-a")["spec"]["unschedulable"] is False
    assert exoctl("get", "nodes").stdout.splitlines()[1].split()[1] == "Ready"


def test_cordon_of_a_missing_node_is_not_found(exoctl):
    result = exoctl("cordon", "ghost")
    assert result.code == 1 and 'nodes.exo.dev "ghost" not found' in result.stderr


def test_drain_of_a_node_without_shards_cordons_it_and_is_done(api, exoctl):
    api.create(_node("node-a", ready="True", port=int(api.url.rsplit(":", 1)[1])))
    result = exoctl("drain", "node-a", "--timeout", "10s")
    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == ["node.exo.dev/node-a cordoned", "0 shards on node-a", "node.exo.dev/node-a drained"]


def test_drain_times_out_non_zero_while_a_shard_stays_on_the_node(api, exoctl):
    api.create(_node("node-b", ready="True", port=int(api.url.rsplit(":", 1)[1])))
    api.create(_shard())
    result = exoctl("drain", "node-b", "--timeout", "1s")
    assert result.code == 1
    assert "1 shard on node-b (llama-0-1)" in result.stdout
    assert "timed out after 1s draining node node-b: 1 shard(s) left" in result.stderr


def test_drain_reports_progress_until_the_shard_moved_and_the_deployment_is_ready(api, exoctl):
    api.create(_node("node-b", ready="True", port=int(api.url.rsplit(":", 1)[1])))
    exoctl("apply", "-f", "-", input=deployment_yaml())
    api.create(_shard())

    def move_the_shard() -> None:  # what the scheduler does: the shard goes elsewhere, then the deployment is Ready
        time.sleep(1.5)
        api.submit("delete", _shard())
        api.set_status("ModelDeployment", "llama", {"readyReplicas": 1, "conditions": [READY]}, namespace="default")

    mover = threading.Thread(target=move_the_shard)
    mover.start()
    result = exoctl("drain", "node-b", "--timeout", "20s")
    mover.join()
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "1 shard on node-b (llama-0-1); waiting for Ready: default/llama"
    assert lines[-1] == "node.exo.dev/node-b drained"


def test_cordon_needs_the_admin_role(api, exoctl, exoctl_env):
    api.create(_node("node-a", ready="True", port=int(api.url.rsplit(":", 1)[1])))
    edit = exoctl("token", "create", "--role", "edit").stdout.strip()
    refused = exoctl("cordon", "node-a", env={**exoctl_env, "EXOCTL_TOKEN": edit})
    assert refused.code == 1 and "Forbidden" in refused.stderr and 'needs role "admin"' in refused.stderr
    assert not api.get("Node", "node-a")["spec"].get("unschedulable")
