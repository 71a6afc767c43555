"""Continuous batching: aggregate decode tokens/s of 1, 2, 4 and 8 concurrent streams through the
OpenAI API of real ``exo`` processes, on 1 node and on 2 stages (a fresh cluster each, the larger
local model, ``build_model("small")``), against 1 stream on the same cluster; and each request's
p50/p95 inter-token latency. Every stream gets a different prompt, greedy.

Nodes run pinned to the files' dtype and MLX's bundled BLAS (as every test cluster, so outputs
compare with mlx-lm's). ``--fast-path`` adds, in the same run, clusters whose nodes pick their own
(``--compute-dtype auto --blas auto``: float32 with OpenBLAS preloaded where that measures faster);
the table names the dtype and BLAS each node reported in its status.

    uv run python -m bench.batching [--tokens 32] [--streams 1,2,4,8] [--stages 1,2] [--fast-path]
    uv run python -m bench.batching --smoke   # tiny model, 1 and 2 streams, a few tokens (CI)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.report import print_table
from exo_ctl import sse
from exo_ctl.http import HttpClient
from exo_ctl.model_builder.build_model import build_model
from harness.cluster import ExoProcess, start_cluster
from harness.serving import API, DEPLOYMENTS, wait_nodes_ready, wait_serving

APPLY = "application/apply-patch+yaml"
# The node arguments of each configuration: pinned as in tests (harness.cluster), or the node's own choice.
CONFIGS = {"pinned": (), "fast path": ("--compute-dtype", "auto", "--blas", "auto")}
TOPICS = ["rivers", "bridges", "compilers", "bees", "glaciers", "printing", "trains", "lighthouses"]


def manifest(name: str, model: Path, *, strategy: str, streams: int) -> str:
    return (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\nspec:\n"
            f"  model:\n    source: {model}\n  placement:\n    strategy: {strategy}\n"
            f"  resources:\n    maxConcurrentRequests: {streams}\n    maxBatchSize: {streams}\n")


def stream_completion(node: ExoProcess, prompt: str, tokens: int) -> dict[str, Any]:
    """One streamed completion: when each text event arrived, and the token count (from usage)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    client = HttpClient(node.api_url, token=node.secret, timeout=600)
    start = time.perf_counter()
    response = client.open("POST", "/v1/completions", body=body)
    stamps: list[float] = []
    count = 0
    for data in sse.data(response.lines()):  # an error event raises HttpError
        if data.get("usage"):
            count = data["usage"]["completion_tokens"]
        elif data.get("choices") and data["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    assert len(stamps) > 1 and count > 1, f"a stream sent {len(stamps)} text events, {count} tokens"
    return {"start": start, "stamps": stamps, "tokens": count}


def streams(node: ExoProcess, count: int, tokens: int) -> dict[str, Any]:
    """``count`` concurrent streams: decode tokens/s of all together (the tokens after each stream's
    first, over the time from the first first-token to the last token) and inter-token latencies."""
    prompts = [f"A short story about {TOPICS[i % len(TOPICS)]} number {i}:" for i in range(count)]
    with ThreadPoolExecutor(count) as pool:
        runs = list(pool.map(lambda p: stream_completion(node, p, tokens), prompts))
    decoded = sum(r["tokens"] - 1 for r in runs)
    span = max(r["stamps"][-1] for r in runs) - min(r["stamps"][0] for r in runs)
    gaps = sorted(b - a for r in runs for a, b in zip(r["stamps"], r["stamps"][1:]))
    return {"streams": count, "decode_tps": decoded / span, "tokens": sum(r["tokens"] for r in runs),
            "itl_p50_ms": 1000 * statistics.median(gaps),
            "itl_p95_ms": 1000 * gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))]}


def node_compute(node: ExoProcess) -> str:
    """How the cluster's nodes compute, from their status: "bfloat16 (files) / reference" and the like."""
    status, _, listing = node.request("GET", f"{API}/nodes")
    assert status == 200, listing
    seen = sorted({f"{c.get('dtype') or 'files'} / {c.get('blas') or '?'}"
                   for c in (n.get("status", {}).get("compute", {}) for n in listing["items"])})
    return ", ".join(seen)


def cluster_run(model: Path, *, stages: int, config: str, counts: list[int], tokens: int,
                root: Path) -> dict[str, Any]:
    cluster = start_cluster(stages, root / f"stages{stages}-{config.replace(' ', '-')}", extra_args=CONFIGS[config])
    try:
        wait_nodes_ready(cluster, stages)
        entry = cluster.nodes[0]
        body = manifest("bench", model, strategy="Pack" if stages == 1 else "Spread", streams=max(counts))
        status, _, reply = entry.request("PATCH", f"{DEPLOYMENTS}/bench", body=body, content_type=APPLY)
        assert status in (200, 201), reply
        wait_serving(entry, "bench", stages=stages, timeout=120)
        compute = node_compute(entry)  # read once serving: a node reports its compute after its start-up profile
        stream_completion(entry, "Warm-up:", 4)
        runs = [streams(entry, count, tokens) for count in counts]
        base = runs[0]["decode_tps"]
        for run in runs:
            run["speedup"] = run["decode_tps"] / base
        return {"stages": stages, "config": config, "compute": compute, "runs": runs}
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.close()


def label(cluster: dict[str, Any]) -> str:
    where = "1 node" if cluster["stages"] == 1 else f"{cluster['stages']} stages"
    return where if cluster["config"] == "pinned" else f"{where}, fast path ({cluster['compute']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="tokens per stream (default 32)")
    parser.add_argument("--streams", default="1,2,4,8", help="concurrent streams to measure; the first is the base")
    parser.add_argument("--stages", default="1,2", help="pipeline stages of each cluster (default 1,2)")
    parser.add_argument("--fast-path", action="store_true",
                        help="also clusters whose nodes pick their dtype and BLAS (--compute-dtype auto --blas auto)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 and 2 streams, a few tokens")
    args = parser.parse_args(argv)
    if args.smoke:
        model, counts, tokens = build_model("tiny"), [1, 2], 4
    else:
        model, counts, tokens = build_model("small"), [int(c) for c in args.streams.split(",")], args.tokens
    configs = ["pinned", "fast path"] if args.fast_path else ["pinned"]
    report: dict[str, Any] = {"model": model.name, "tokens_per_stream": tokens, "clusters": []}
    with tempfile.TemporaryDirectory(prefix="exo-bench-batching-") as tmp:
        for stages in (int(n) for n in args.stages.split(",")):
            for config in configs:
                report["clusters"].append(cluster_run(model, stages=stages, config=config, counts=counts,
                                                      tokens=tokens, root=Path(tmp)))
                print(json.dumps(report["clusters"][-1]), flush=True)
    clusters = report["clusters"]
    header = ["streams", *(f"{label(c)}: tok/s (× 1 stream)" for c in clusters),
              *(f"{label(c)}: ITL p50 / p95" for c in clusters)]
    rows = []
    for index, count in enumerate(counts):
        runs = [c["runs"][index] for c in clusters]
        rows.append([count, *(f"{r['decode_tps']:.2f} ({r['speedup']:.2f}×)" for r in runs),
                     *(f"{r['itl_p50_ms']:.0f} / {r['itl_p95_ms']:.0f} ms" for r in runs)])
    print_table(f"batching: {report['model']} model, {tokens} greedy tokens per stream, aggregate decode tokens/s",
                header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
