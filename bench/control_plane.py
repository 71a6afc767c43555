"""Control-plane benchmark: local ``exo`` nodes on 127.0.0.1.

    uv run python -m bench.control_plane [--applies 300] [--trials 5] [--only writes|membership]
    uv run python -m bench.control_plane --smoke   # a few applies, one trial of each (CI)

Writes: sequential applies/s and p50/p99 apply latency through the HTTP API (PATCH apply over a
keep-alive connection, to the leader and to a follower), and leader failover after kill -9: the
time from the kill until a survivor accepts a write (median of the trials).
Targets: p50 apply <= 5 ms, failover <= 2 s median.

Membership (zero-config): the time from starting N processes with no --peers (mDNS on
127.0.0.1) until they are one Ready cluster, and the time from kill -9 of a follower until the
leader reports its Node NotReady (default --node-timeout 3), each the median of the trials.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import print_table  # noqa: E402
from exo_ctl.http import HttpClient  # noqa: E402
from harness.cluster import Cluster, ExoProcess, start_cluster  # noqa: E402
from harness.membership import NODES, log_times, ready_by_node, unique_secret  # noqa: E402

PATH = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments/bench"


def manifest(serial: int) -> bytes:
    """A manifest that differs from the previous one (a label), so each apply is a new revision."""
    return (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: bench\n"
            f"  labels:\n    serial: \"{serial}\"\n"
            f"spec:\n  model:\n    source: hf://org/bench\n  replicas: 1\n").encode()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def apply_once(client: HttpClient, replicas: int) -> int:
    answer = client.open("PATCH", PATH, body=manifest(replicas), content_type="application/apply-patch+yaml",
                         check=False)
    answer.read()
    return answer.status


def measure_applies(node: ExoProcess, count: int, start: int) -> tuple[float, list[float]]:
    client = HttpClient(node.api_url, token=node.secret, timeout=10, keep_alive=True)
    latencies = []
    began = time.perf_counter()
    for i in range(count):
        t0 = time.perf_counter()
        status = apply_once(client, start + i)
        latencies.append((time.perf_counter() - t0) * 1000)
        if status not in (200, 201):
            raise RuntimeError(f"apply through {node.name} answered {status}")
    elapsed = time.perf_counter() - began
    client.close()
    return count / elapsed, latencies


def measure_failover(cluster: Cluster) -> float:
    leader = cluster.leader()
    survivor = next(n for n in cluster.nodes if n is not leader)
    leader.kill()
    killed_at = time.perf_counter()
    replicas = 1000
    while True:
        client = HttpClient(survivor.api_url, token=survivor.secret, timeout=5)
        try:
            if apply_once(client, replicas) in (200, 201):
                elapsed = time.perf_counter() - killed_at
                break
        except OSError:  # ConnectionFailed: the survivor is not answering yet
            pass
        replicas += 1
        if time.perf_counter() - killed_at > 30:
            raise RuntimeError("no write accepted 30 s after killing the leader")
        time.sleep(0.01)
    leader.start()
    leader.wait_ready()
    return elapsed


def one_ready_cluster(cluster: Cluster) -> bool:
    """Every node reports all members, and every node lists every Node as Ready."""
    everyone = sorted(n.raft_address for n in cluster.nodes)
    for node in cluster.nodes:
        status, _, doc = node.request("GET", "/internal/v1/members", timeout=2.0)
        if status != 200 or sorted(m["raftAddress"] for m in doc["members"]) != everyone:
            return False
        status, _, listing = node.request("GET", NODES, timeout=2.0)
        if status != 200 or list(ready_by_node(listing["items"]).values()) != ["True"] * len(everyone):
            return False
    return True


def wait_for(predicate, *, timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll until ``predicate()``; the perf_counter time it first held."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            if predicate():
                return time.perf_counter()
        except OSError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"{what}: not within {timeout:g} s")


def measure_formation(nodes: int, root: Path) -> tuple[float, float]:
    """Seconds from starting ``nodes`` processes (no --peers) to one Ready cluster, and from the
    first mDNS announcement (log time; before it, the processes import their modules)."""
    began = time.perf_counter()
    cluster = start_cluster(nodes, root, secret=unique_secret(), discovery=True)
    try:
        formed = wait_for(lambda: one_ready_cluster(cluster), timeout=60, what="one Ready cluster")
        formed_wall = time.time() - (time.perf_counter() - formed)
        announced = min(t for n in cluster.nodes for t in log_times(n.log_path, "discovery: announcing"))
        return formed - began, formed_wall - announced
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.close()


def measure_not_ready(cluster: Cluster) -> float:
    """Seconds from kill -9 of a follower to the leader reporting its Node NotReady; the
    follower is restarted and Ready again before this returns."""
    leader = cluster.leader()
    wait_for(lambda: one_ready_cluster(cluster), timeout=30, what="all Ready before the kill")
    victim = next(n for n in cluster.nodes if n is not leader)

    def not_ready() -> bool:
        status, _, listing = leader.request("GET", NODES, timeout=2.0)
        return status == 200 and ready_by_node(listing["items"]).get(victim.name) == "False"

    victim.kill()
    killed_at = time.perf_counter()
    elapsed = wait_for(not_ready, timeout=30, what=f"{victim.name} NotReady") - killed_at
    victim.start()
    victim.wait_ready()
    return elapsed


def run_writes(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="exo-bench-") as tmp:
        cluster = start_cluster(3, Path(tmp))
        try:
            leader = cluster.leader()
            follower = next(n for n in cluster.nodes if n is not leader)
            measure_applies(leader, 20, 1)  # warm up
            rows = []
            for label, node in (("via leader", leader), ("via follower", follower)):
                rate, lat = measure_applies(node, args.applies, 100 + len(rows) * args.applies)
                rows.append((label, rate, statistics.median(lat), percentile(lat, 0.99)))
            failovers = [measure_failover(cluster) for _ in range(args.trials)]
        except BaseException:
            print(cluster.logs(), file=sys.stderr)
            raise
        finally:
            cluster.close()

    table = [(f"sequential applies {label} ({args.applies})", f"{rate:.0f}/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
             for label, rate, p50, p99 in rows]
    table.append((f"leader failover after kill -9 (a survivor accepts a write), {args.trials} trials",
                  summary(failovers)))
    print_table("control plane, 3 nodes on 127.0.0.1 (targets: p50 apply <= 5 ms, failover median <= 2 s)",
                ["what", "measured"], table)


def summary(values: list[float]) -> str:
    return (f"median {statistics.median(values):.2f} s, min {min(values):.2f} s, max {max(values):.2f} s, "
            f"all {' '.join(f'{v:.2f}' for v in values)}")


def run_membership(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="exo-bench-") as tmp:
        formations = [measure_formation(args.nodes, Path(tmp) / f"formation{i}")
                      for i in range(args.formation_trials)]
        not_ready = [] if args.smoke else liveness(args, Path(tmp) / "liveness")
    print_table("zero-config membership on 127.0.0.1 (mDNS, no --peers)", ["what", "measured"], [
        (f"start of {args.nodes} processes -> one Ready cluster, {args.formation_trials} trials",
         summary([total for total, _ in formations])),
        ("first mDNS announcement -> one Ready cluster, same trials", summary([since for _, since in formations])),
        (f"kill -9 of a follower -> its Node NotReady (--node-timeout {args.node_timeout:g}), {args.trials} trials",
         summary(not_ready) if not_ready else "not measured with --smoke"),
    ])


def liveness(args: argparse.Namespace, root: Path) -> list[float]:
    cluster = start_cluster(3, root, secret=unique_secret(), discovery=True,
                            extra_args=["--node-timeout", f"{args.node_timeout:g}"])
    try:
        return [measure_not_ready(cluster) for _ in range(args.trials)]
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--applies", type=int, default=300)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=3, help="processes started for the formation time")
    parser.add_argument("--formation-trials", type=int, default=3)
    parser.add_argument("--node-timeout", type=float, default=3.0)
    parser.add_argument("--only", choices=["writes", "membership"])
    parser.add_argument("--smoke", action="store_true", help="10 applies, one failover, one 2-node formation")
    args = parser.parse_args()
    if args.smoke:
        args.applies, args.trials, args.nodes, args.formation_trials = 10, 1, 2, 1
    if args.only != "membership":
        run_writes(args)
    if args.only != "writes":
        run_membership(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
