"""Tensor parallelism: decode tokens/s of the small model (``build_model("small")``) with one stage
split over 2 tensor ranks on 2 real ``exo`` node processes (ring over TCP on 127.0.0.1), through
the OpenAI API, against single-process mlx_lm on the same prompt ids in the same run (alternated,
best of each, and the spread of the per-round ratios). MLX on a Linux CPU uses one core per
process, so two ranks can use two cores. ``--fast-path`` starts the nodes with ``--compute-dtype auto
--blas auto`` and runs mlx_lm in the dtype they chose (float32 where that measures faster), with
OpenBLAS preloaded when this host has it, as the nodes do.

    uv run python -m bench.tensor_parallel [--tokens 64] [--rounds 3] [--fast-path]
    uv run python -m bench.tensor_parallel --smoke   # tiny model, a few tokens (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.pipeline import single_process, stream_completion
from bench.report import print_table
from exo_ctl.model_builder.build_model import build_model
from harness.cluster import start_cluster
from harness.serving import API, APPLY, DEPLOYMENTS, wait_nodes_ready, wait_serving
from reconciler.runtime.blas import find_openblas, preload_environment

FAST_PATH = ("--compute-dtype", "auto", "--blas", "auto")

PROMPT = "The history of distributed computing begins with"


def manifest(source: Path, *, dtype: str | None) -> str:
    dtype_line = f"    dtype: {dtype}\n" if dtype else ""
    return (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: bench\nspec:\n"
            f"  model:\n    source: {source}\n{dtype_line}  placement:\n    strategy: Pack\n"
            f"  parallelism:\n    tensor: 2\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of each side")
    parser.add_argument("--dtype", default=None, help="spec.model.dtype of the deployment (default: the files')")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few tokens, one round")
    parser.add_argument("--fast-path", action="store_true",
                        help="nodes pick their dtype and BLAS; mlx_lm runs in the same dtype and BLAS")
    args = parser.parse_args(argv)
    model = build_model("tiny" if args.smoke else "small")
    tokens, rounds = (6, 1) if args.smoke else (args.tokens, args.rounds)
    from mlx_lm.utils import load_tokenizer

    ids = list(load_tokenizer(model).encode(PROMPT))
    singles: list[dict[str, Any]] = []
    ranks: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="exo-bench-tensor-") as tmp:
        cluster = start_cluster(2, Path(tmp) / "tp", extra_args=FAST_PATH if args.fast_path else ())
        try:
            wait_nodes_ready(cluster, 2)
            entry = cluster.nodes[0]
            status, _, reply = entry.request("PATCH", f"{DEPLOYMENTS}/bench", body=manifest(model, dtype=args.dtype),
                                             content_type=APPLY, timeout=60)
            assert status in (200, 201), reply
            shards = wait_serving(entry, "bench", stages=2, timeout=240)
            entry = next(n for n in cluster.nodes if n.name == next(
                s["spec"]["nodeName"] for s in shards if s["spec"]["tensor"]["rank"] == 0))
            dtype, blas = node_compute(entry) if args.fast_path else (None, "bundled")
            env = preload_environment("auto", environ=os.environ, system=platform.system(),
                                      library=find_openblas()) if blas == "openblas" else None
            stream_completion(entry, ids, 8)  # warm-up
            for _ in range(rounds):  # alternated, so both sides meet the same load from others
                singles.append(single_process(model, ids, tokens, dtype=dtype, env=env))
                ranks.append(stream_completion(entry, ids, tokens))
                print(json.dumps({"single": singles[-1], "tensor2": ranks[-1],
                                  "ratio": ranks[-1]["decode_tps"] / singles[-1]["decode_tps"],
                                  "load": os.getloadavg()[0]}), flush=True)
        except BaseException:
            print(cluster.logs(), file=sys.stderr)
            raise
        finally:
            cluster.close()
    best_single = max(r["decode_tps"] for r in singles)
    best_tp = max(r["decode_tps"] for r in ranks)
    ratio = best_tp / best_single
    per_round = sorted(t["decode_tps"] / s["decode_tps"] for s, t in zip(singles, ranks))
    rows = [
        ["decode tokens/s (best, median)", f"{best_single:.2f} ({statistics.median(r['decode_tps'] for r in singles):.2f})",
         f"{best_tp:.2f} ({statistics.median(r['decode_tps'] for r in ranks):.2f})"],
        ["time to first token (median)", f"{statistics.median(r['ttft'] for r in singles):.2f} s",
         f"{statistics.median(r['ttft'] for r in ranks):.2f} s"],
        ["tensor 2 / single (best / best)", "1.00x", f"{ratio:.2f}x"],
        ["per-round ratios (min, median, max)", "", ", ".join(f"{r:.2f}x" for r in
                                                              (per_round[0], statistics.median(per_round), per_round[-1]))],
    ]
    load = os.getloadavg()[0]
    print_table(f"tensor parallel{' (fast path: ' + str(dtype or 'files') + ')' if args.fast_path else ''}: "
                f"{model.name} model, {tokens} greedy tokens, {rounds} rounds, "
                f"prompt {len(ids)} ids, load average {load:.1f}, tensor 2 / single = {ratio:.2f}x",
                ["", "single mlx_lm", "2 tensor ranks (2 nodes)"], rows)
    return 0


def node_compute(node: Any) -> tuple[str | None, str]:
    """(dtype, blas) the entry node computes in, from its status (dtype None: the files')."""
    status, _, listing = node.request("GET", f"{API}/nodes")
    assert status == 200, listing
    compute = next(n.get("status", {}).get("compute", {}) for n in listing["items"] if n["metadata"]["name"] == node.name)
    return compute.get("dtype"), compute.get("blas") or "reference"


if __name__ == "__main__":
    sys.exit(main())
