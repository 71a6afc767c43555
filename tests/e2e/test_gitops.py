"""The GitOps round through the real exoctl binary and three real nodes: a folder of manifests
applied with --prune, one file removed and the folder applied again removes exactly that
deployment, and exoctl's diff, get and errors behave against a live cluster."""
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.cluster import Cluster, running_cluster

pytestmark = pytest.mark.slow

EXOCTL = shutil.which("exoctl", path=str(Path(sys.executable).parent)) or "exoctl"
SELECTOR = "app.kubernetes.io/part-of=llm"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes for every test here: each writes deployments of its own (names and labels)."""
    with running_cluster(3, tmp_path_factory.mktemp("gitops")) as cluster:
        yield cluster


def write_manifest(folder: Path, name: str, *, replicas: int = 1, part_of: str = "llm") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        "apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\n"
        f"metadata:\n  name: {name}\n  labels:\n    app.kubernetes.io/part-of: {part_of}\n"
        f"spec:\n  model:\n    source: /models/{name}-not-on-this-machine\n  replicas: {replicas}\n")
    return path


def exoctl(node, *args: str, home: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "EXOCTL_SERVER": node.api_url, "EXOCTL_TOKEN": node.secret}
    done = subprocess.run([EXOCTL, *args], capture_output=True, text=True, env=env, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def settled(node, home: Path) -> dict[str, dict]:
    """The deployments of SELECTOR as ``node`` serves them, once the scheduler has written every status."""
    deadline = time.monotonic() + 15
    while True:
        listing = json.loads(exoctl(node, "get", "md", "-l", SELECTOR, "-o", "json", home=home).stdout)
        items = {item["metadata"]["name"]: item for item in listing["items"]}
        if all((i.get("status") or {}).get("observedGeneration") == i["metadata"]["generation"] for i in items.values()):
            return items
        assert time.monotonic() < deadline, f"statuses never settled: {items}"
        time.sleep(0.2)


def test_a_gitops_round_prunes_exactly_the_deployment_whose_file_left_the_folder(cluster, tmp_path):
    first, third = cluster.nodes[0], cluster.nodes[2]
    repo = tmp_path / "deploy"
    repo.mkdir()
    for name in ("alpha", "beta", "gamma"):
        write_manifest(repo, name)

    applied = exoctl(first, "apply", "-f", str(repo), "--prune", "-l", SELECTOR, home=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == [f"modeldeployment.exo.dev/{n} created" for n in ("alpha", "beta", "gamma")]
    before = settled(third, tmp_path)
    assert sorted(before) == ["alpha", "beta", "gamma"]

    (repo / "alpha.yaml").unlink()
    again = exoctl(first, "apply", "-f", str(repo), "--prune", "-l", SELECTOR, home=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(again.stdout.splitlines()) == ["modeldeployment.exo.dev/alpha pruned",
                                                 "modeldeployment.exo.dev/beta unchanged",
                                                 "modeldeployment.exo.dev/gamma unchanged"]
    after = settled(third, tmp_path)
    assert sorted(after) == ["beta", "gamma"]
    for name in ("beta", "gamma"):  # untouched: same object, same version
        assert after[name]["metadata"] == before[name]["metadata"]
        assert after[name]["spec"] == before[name]["spec"]


def test_diff_against_a_live_cluster_exits_1_on_changes_and_0_once_applied(cluster, tmp_path):
    path = write_manifest(tmp_path, "delta", part_of="diff")
    assert exoctl(cluster.nodes[0], "apply", "-f", str(path), home=tmp_path).returncode == 0
    write_manifest(tmp_path, "delta", replicas=2, part_of="diff")
    changed = exoctl(cluster.nodes[1], "diff", "-f", str(path), home=tmp_path)
    assert changed.returncode == 1 and "+  replicas: 2" in changed.stdout, changed.stdout
    assert exoctl(cluster.nodes[2], "apply", "-f", str(path), home=tmp_path).stdout == \
        "modeldeployment.exo.dev/delta configured\n"
    assert exoctl(cluster.nodes[1], "diff", "-f", str(path), home=tmp_path).returncode == 0


def test_a_bad_manifest_in_the_folder_applies_nothing_and_names_file_and_line(cluster, tmp_path):
    write_manifest(tmp_path, "good", part_of="bad-folder")
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: bad\n"
        "spec:\n  model:\n    source: /m\n  placement:\n    strategy: pack\n")
    done = exoctl(cluster.nodes[0], "apply", "-f", str(tmp_path), home=tmp_path)
    assert done.returncode != 0
    assert "bad.yaml:9" in done.stderr and "spec.placement.strategy" in done.stderr, done.stderr
    listing = json.loads(exoctl(cluster.nodes[0], "get", "md", "-l", "app.kubernetes.io/part-of=bad-folder",
                                "-o", "json", home=tmp_path).stdout)
    assert listing["items"] == []
    assert exoctl(cluster.nodes[0], "get", "md", "bad", home=tmp_path).returncode != 0  # not applied either


def test_an_unreachable_server_and_a_wrong_token_are_one_line_errors(cluster, tmp_path):
    node = cluster.nodes[0]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "EXOCTL_SERVER": node.api_url, "EXOCTL_TOKEN": "wrong"}
    denied = subprocess.run([EXOCTL, "get", "nodes"], capture_output=True, text=True, env=env, timeout=60)
    assert denied.returncode == 1 and len(denied.stderr.strip().splitlines()) == 1
    assert "unauthorized" in denied.stderr
    env["EXOCTL_SERVER"] = "http://127.0.0.1:9"  # discard port: nothing listens
    down = subprocess.run([EXOCTL, "get", "nodes"], capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1
    assert "cannot reach" in down.stderr and "127.0.0.1:9" in down.stderr
