"""kill -9 of a node that holds a Shard → the deployment Ready again on the survivors.

Starts real ``exo`` processes on 127.0.0.1 (the tests' harness), deploys the tiny model with
Spread, then per trial kills one shard holder with SIGKILL, times until the deployment is Ready
for its generation with every layer covered by Ready shards on live nodes, restarts the node and
waits until the layers are spread over all nodes again.

    uv run python -m bench.replacement [--nodes 3] [--trials 5] [--victim follower|leader]
    uv run python -m bench.replacement --smoke   # one trial (CI)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import print_table
from exo_ctl.model_builder.build_model import build_model
from harness.cluster import Cluster, ExoProcess, start_cluster

MDS = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"
SHARDS = "/apis/exo.dev/v1alpha1/shards"


def serving_nodes(node: ExoProcess, name: str, total: int) -> set[str] | None:
    """The nodes serving ``name`` when it is Ready and its Ready shards cover every layer once
    (None while the node is too slow to answer: a loaded machine, not a verdict)."""
    try:
        return _serving_nodes(node, name, total)
    except OSError:
        return None


def _serving_nodes(node: ExoProcess, name: str, total: int) -> set[str] | None:
    status, _, md = node.request("GET", f"{MDS}/{name}", timeout=5.0)
    if status != 200:
        return None
    ready = next((c for c in (md.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), {})
    if ready.get("status") != "True" or ready.get("observedGeneration") != md["metadata"]["generation"]:
        return None
    _, _, listing = node.request("GET", SHARDS, timeout=5.0)
    shards = sorted((s for s in listing["items"] if s["spec"]["deployment"] == f"default/{name}"),
                    key=lambda s: s["spec"]["index"])
    covered = [layer for s in shards for layer in range(s["spec"]["layers"]["start"], s["spec"]["layers"]["end"])]
    if covered != list(range(total)) or any((s.get("status") or {}).get("phase") != "Ready" for s in shards):
        return None
    return {s["spec"]["nodeName"] for s in shards}


def wait_for(predicate, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while (value := predicate()) is None or value is False:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached after {timeout}s")
        time.sleep(0.02)
    return value


def trial(cluster: Cluster, *, victim_role: str, total: int) -> float:
    leader = cluster.leader()
    live = [n for n in cluster.nodes if n.running]
    observer = leader if victim_role == "follower" else next(n for n in live if n is not leader)
    holders = wait_for(lambda: serving_nodes(observer, "tiny", total), 60)
    victim = leader if victim_role == "leader" else next(n for n in live if n is not leader and n.name in holders)
    victim.kill()
    started = time.monotonic()
    wait_for(lambda: (nodes := serving_nodes(observer, "tiny", total)) is not None and victim.name not in nodes, 60)
    elapsed = time.monotonic() - started
    victim.restart()
    wait_for(lambda: (nodes := serving_nodes(observer, "tiny", total)) is not None and len(nodes) == len(cluster.nodes), 60)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--victim", choices=("follower", "leader"), default="follower",
                        help="kill a follower that holds a shard, or the Raft leader (adds a failover)")
    parser.add_argument("--smoke", action="store_true", help="one trial")
    args = parser.parse_args(argv)
    if args.smoke:
        args.trials = 1
    model = build_model("tiny")
    total = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    with tempfile.TemporaryDirectory(prefix="exo-replacement-") as root:
        cluster = start_cluster(args.nodes, Path(root))
        try:
            manifest = {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
                        "metadata": {"name": "tiny", "namespace": "default"},
                        "spec": {"model": {"source": str(model)}, "placement": {"strategy": "Spread"}}}
            status, _, body = cluster.nodes[0].request("PATCH", f"{MDS}/tiny", body=json.dumps(manifest),
                                                       content_type="application/apply-patch+yaml")
            assert status in (200, 201), body
            wait_for(lambda: (n := serving_nodes(cluster.nodes[0], "tiny", total)) and len(n) == args.nodes, 60)
            times = []
            for number in range(args.trials):
                times.append(trial(cluster, victim_role=args.victim, total=total))
                print(f"trial {number + 1}: kill -9 of a {args.victim} -> Ready on the survivors in {times[-1]:.2f}s",
                      flush=True)
        except BaseException:
            print(cluster.logs(), file=sys.stderr)
            raise
        finally:
            cluster.close()
    print(json.dumps({"nodes": args.nodes, "victim": args.victim, "trials": len(times),
                      "p50_s": round(statistics.median(times), 2), "min_s": round(min(times), 2),
                      "max_s": round(max(times), 2)}))
    print_table(f"re-placement, tiny model, Spread over {args.nodes} nodes", ["what", "measured"], [
        (f"kill -9 of a {args.victim} holding a Shard -> Ready on the survivors, {len(times)} trials",
         f"p50 {statistics.median(times):.2f} s, min {min(times):.2f}, max {max(times):.2f}")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
