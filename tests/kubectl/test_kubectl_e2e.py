"""End to end: a real node with --tls on, a kubeconfig from `exoctl config kubeconfig`, and the real
kubectl deploying a model (real MLX load) and reading nodes, shards and events."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from exo_ctl.model_builder.build_model import build_model

KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


def test_kubectl_deploys_and_watches_a_model_on_a_real_node(exo_cluster, tiny_model, tmp_path):
    if KUBECTL is None:
        pytest.fail("kubectl is not installed (CI installs Debian's kubernetes-client package)")
    cluster = exo_cluster(1, extra_args=["--tls", "on"])
    node = cluster.nodes[0]
    printed = subprocess.run([sys.executable, "-m", "exo_ctl.cli.main", "--server", node.api_url, "--token",
                              cluster.secret, "config", "kubeconfig", "--ca", str(node.ca_path)],
                             capture_output=True, text=True, timeout=30, check=True)
    (tmp_path / "kubeconfig").write_text(printed.stdout)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "kubeconfig")}

    def kubectl(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run([KUBECTL, *args], input=stdin, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done.stdout

    nodes = kubectl("get", "nodes").splitlines()
    assert nodes[0].split()[:2] == ["NAME", "STATUS"] and nodes[1].split()[:2] == [node.name, "Ready"]
    manifest = (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: tiny}}\n"
                f"spec: {{model: {{source: {tiny_model}}}}}\n")
    assert "created" in kubectl("apply", "-f", "-", stdin=manifest)
    assert "condition met" in kubectl("wait", "--for=condition=Ready", "md/tiny", "--timeout=90s")
    shards = kubectl("get", "shards").splitlines()
    assert shards[1].split()[0] == "default/tiny" and "Ready" in shards[1]
    reasons = kubectl("get", "events", "-o", "jsonpath={.items[*].reason}").split()
    assert {"Scheduled", "Loading", "Loaded"} <= set(reasons)
    assert "Scheduled" in kubectl("describe", "md", "tiny").split("Events:")[1]
    assert "deleted" in kubectl("delete", "md", "tiny")
