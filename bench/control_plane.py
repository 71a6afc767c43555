"""Control-plane benchmark: 3 local ``exo`` nodes on 127.0.0.1.

    uv run python bench/control_plane.py [--applies 300] [--trials 5]

Measures sequential applies/s and p50/p99 apply latency through the HTTP API (PATCH apply over a
keep-alive connection, to the leader and to a follower), and leader failover after kill -9: the
time from the kill until a survivor accepts a write (median of the trials).
Targets: p50 apply <= 5 ms, failover <= 2 s median.
"""
from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster import Cluster, ExoProcess, start_cluster  # noqa: E402

PATH = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments/bench"


def manifest(serial: int) -> bytes:
    """A manifest that differs from the previous one (a label), so each apply is a new revision."""
    return (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: bench\n"
            f"  labels:\n    serial: \"{serial}\"\n"
            f"spec:\n  model:\n    source: hf://org/bench\n  replicas: 1\n").encode()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def apply_once(conn: http.client.HTTPConnection, node: ExoProcess, replicas: int) -> int:
    conn.request("PATCH", PATH, body=manifest(replicas), headers={
        "Content-Type": "application/apply-patch+yaml", "Authorization": f"Bearer {node.secret}"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def measure_applies(node: ExoProcess, count: int, start: int) -> tuple[float, list[float]]:
    conn = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=10)
    latencies = []
    began = time.perf_counter()
    for i in range(count):
        t0 = time.perf_counter()
        status = apply_once(conn, node, start + i)
        latencies.append((time.perf_counter() - t0) * 1000)
        if status not in (200, 201):
            raise RuntimeError(f"apply through {node.name} answered {status}")
    elapsed = time.perf_counter() - began
    conn.close()
    return count / elapsed, latencies


def measure_failover(cluster: Cluster) -> float:
    leader = cluster.leader()
    survivor = next(n for n in cluster.nodes if n is not leader)
    leader.kill()
    killed_at = time.perf_counter()
    replicas = 1000
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", survivor.api_port, timeout=5)
        try:
            if apply_once(conn, survivor, replicas) in (200, 201):
                elapsed = time.perf_counter() - killed_at
                break
        except OSError:
            pass
        finally:
            conn.close()
        replicas += 1
        if time.perf_counter() - killed_at > 30:
            raise RuntimeError("no write accepted 30 s after killing the leader")
        time.sleep(0.01)
    leader.start()
    leader.wait_ready()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--applies", type=int, default=300)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
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

    print(f"control plane, 3 nodes on 127.0.0.1, {args.applies} sequential applies each")
    print(f"{'path':<14} {'applies/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for label, rate, p50, p99 in rows:
        print(f"{label:<14} {rate:>10.0f} {p50:>8.2f} {p99:>8.2f}")
    print(f"leader failover after kill -9 (write accepted by a survivor), {args.trials} trials:")
    print(f"  median {statistics.median(failovers):.2f} s, max {max(failovers):.2f} s, "
          f"all {' '.join(f'{f:.2f}' for f in failovers)}")
    print("targets: p50 apply <= 5 ms, failover median <= 2 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
