"""Model supply: time and bytes for 3 real ``exo`` nodes on 127.0.0.1 to turn a deployment of the
small model Ready (a) when every node has the model on disk, (b) when only node0 has it and the
others fetch their layers' tensors from it over the data port; against, in the same run, a plain
copy of the whole model directory to each of the two other nodes over a loopback TCP socket
(what a node that downloads the whole repository moves).

    uv run python -m bench.weights [--model small] [--rounds 1]
    uv run python -m bench.weights --smoke    # tiny model, one round (CI)
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.report import print_table
from exo_ctl.model_builder.build_model import build_model
from harness.cluster import DEFAULT_SECRET, Cluster, ExoProcess
from harness.serving import apply, wait_nodes_ready, wait_serving
from reconciler.models.model_info import model_info_name

REPO = "exo-bench/model"
SOURCE = f"hf://{REPO}"
COMMIT = "b" * 40
NODES = 3
_COPY_CHUNK = 1 << 20


def hf_home(root: Path, model: Path | None) -> Path:
    """A node's HF_HOME, with ``model`` in its hub cache as ``REPO`` when given."""
    repo = root / "hub" / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    if model is not None:
        shutil.copytree(model, repo / "snapshots" / COMMIT)
        (repo / "refs" / "main").write_text(COMMIT)
    return root


def fetched_bytes(node: ExoProcess) -> dict[str, float]:
    status, _, text = node.request("GET", "/metrics")
    assert status == 200, text
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("exo_weights_fetched_bytes_total{"):
            labels, value = line.rsplit(" ", 1)
            source = labels.split('source="', 1)[1].split('"', 1)[0]
            totals[source] = totals.get(source, 0.0) + float(value)
    return totals


def cache_bytes(node: ExoProcess) -> int:
    directory = node.data_dir / "models" / model_info_name(SOURCE, None)
    return sum(f.stat().st_size for f in directory.glob("model*.safetensors"))


def cluster_run(model: Path, *, holders: int, root: Path) -> dict[str, Any]:
    """Seconds from apply to Ready with the first ``holders`` nodes holding the model, no hub."""
    cluster = Cluster(nodes=[], root=root / "cluster", secret=DEFAULT_SECRET)
    try:
        for index in range(NODES):
            home = hf_home(root / f"hf{index}", model if index < holders else None)
            cluster.add_node(env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"},
                             peers=[cluster.nodes[0].api_address] if index else [])
        wait_nodes_ready(cluster, NODES)
        entry = cluster.nodes[0]
        started = time.perf_counter()
        apply(entry, "bench", SOURCE, strategy="Spread")
        shards = wait_serving(entry, "bench", stages=NODES, timeout=600)
        seconds = time.perf_counter() - started
        return {"holders": holders, "seconds": seconds,
                "fetched": [sum(fetched_bytes(node).values()) for node in cluster.nodes],
                "on_disk": [cache_bytes(node) for node in cluster.nodes],
                "shares": {s["spec"]["nodeName"]: s["spec"]["memoryBytes"] for s in shards}}
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.close()


def tcp_copy(model: Path, dest: Path) -> int:
    """Copy every file of ``model`` into ``dest`` through a loopback TCP connection; bytes moved."""
    files = sorted(f for f in model.rglob("*") if f.is_file())
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def send() -> None:
        connection, _ = server.accept()
        with connection:
            for file in files:
                with open(file, "rb") as handle:
                    while chunk := handle.read(_COPY_CHUNK):
                        connection.sendall(chunk)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    moved = 0
    with socket.create_connection(("127.0.0.1", port)) as connection:
        for file in files:
            target = dest / file.relative_to(model)
            target.parent.mkdir(parents=True, exist_ok=True)
            left = file.stat().st_size
            with open(target, "wb") as out:
                while left:
                    chunk = connection.recv(min(_COPY_CHUNK, left))
                    if not chunk:
                        raise ConnectionError(f"the copy of {file.name} ended {left} bytes short")
                    out.write(chunk)
                    left -= len(chunk)
                    moved += len(chunk)
    sender.join()
    server.close()
    return moved


def copy_run(model: Path, *, root: Path) -> dict[str, Any]:
    started = time.perf_counter()
    moved = sum(tcp_copy(model, root / f"copy{index}") for index in range(1, NODES))
    return {"seconds": time.perf_counter() - started, "moved": moved}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", choices=["tiny", "small"])
    parser.add_argument("--rounds", type=int, default=1, help="repeat each scenario, interleaved")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one round")
    args = parser.parse_args(argv)
    model = build_model("tiny" if args.smoke else args.model)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    results: dict[str, list[dict[str, Any]]] = {"every": [], "one": [], "copy": []}
    with tempfile.TemporaryDirectory(prefix="exo-bench-weights-") as tmp:
        for round_ in range(1 if args.smoke else args.rounds):
            root = Path(tmp) / f"round{round_}"
            results["copy"].append(copy_run(model, root=root / "copy"))
            results["every"].append(cluster_run(model, holders=NODES, root=root / "every"))
            results["one"].append(cluster_run(model, holders=1, root=root / "one"))
    print(json.dumps({"model": args.model, "weights_bytes": weights, **results}, indent=1))
    best = {name: min(runs, key=lambda r: r["seconds"]) for name, runs in results.items()}
    every, one, copy = best["every"], best["one"], best["copy"]
    rows = [
        ["(a) every node has the model", f"{every['seconds']:.2f}", mib(sum(every["fetched"])),
         " / ".join(mib(b) for b in every["on_disk"])],
        ["(b) only node0 has it: peers fetch their layers", f"{one['seconds']:.2f}", mib(sum(one["fetched"])),
         " / ".join(mib(b) for b in one["on_disk"])],
        ["baseline: whole directory copied to node1 and node2 (loopback TCP)", f"{copy['seconds']:.2f}",
         mib(copy["moved"]), f"{mib(0)} / " + " / ".join(mib(copy['moved'] / (NODES - 1)) for _ in range(NODES - 1))],
    ]
    print_table(f"weights: {args.model} model ({mib(weights)} MiB of safetensors), {NODES} nodes, best of "
                f"{len(results['one'])}", ["scenario", "seconds (apply → Ready; copy: copy only)",
                                          "MiB moved between nodes", "MiB written per node (node0 / 1 / 2)"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
