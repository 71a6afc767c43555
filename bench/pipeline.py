"""The inference data path end to end, on a local model (``build_model("small")`` unless
``--model tiny``): decode tokens/s and time to first token through the OpenAI API of real ``exo``
processes with 1, 2 and 3 stages (a fresh 1-, 2- and 3-node cluster, Spread), against
single-process mlx_lm on the same prompt ids; the milliseconds each token costs over the single
process; time to first token of a long prompt (1,024 ids); the added latency per stage hop; peak
RSS of each stage process against the single process; aggregate tokens/s with 1, 2 and 4
concurrent requests. Paired rounds (single process, then the cluster, back to back) give the added
milliseconds a token with the machine's drift cancelled.

    uv run python -m bench.pipeline [--tokens 128] [--concurrent-tokens 48] [--model tiny --stages 1,2]
                                    [--rounds 5]
    uv run python -m bench.pipeline --smoke   # tiny model, 2 stages, a few tokens (CI)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
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
from reconciler.node import data_path_token
from harness.cluster import ExoProcess, start_cluster
from harness.serving import apply, wait_nodes_ready, wait_serving

PROMPT = "The history of distributed computing begins with"
SINGLE_PROCESS = """
import json, resource, sys, time
import mlx.core as mx, mlx_lm
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler
model, tokenizer = mlx_lm.load(sys.argv[1])
ids, n, repeats, long_ids = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
if len(sys.argv) > 6:
    model.set_dtype(getattr(mx, sys.argv[6]))
def run(prompt, count):
    start, stamps = time.perf_counter(), []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=count, sampler=make_sampler(temp=0.0)):
        stamps.append(time.perf_counter())
    return start, stamps
run(ids, 8)  # warm-up
runs = [run(ids, n) for _ in range(repeats)]
tps = [(len(stamps) - 1) / (stamps[-1] - stamps[0]) for _, stamps in runs]
long_ttft = [stamps[0] - start for start, stamps in (run(long_ids, 1) for _ in range(repeats))]
print(json.dumps({"ttft": sorted(s[0] - t for t, s in runs)[len(runs) // 2], "tokens": len(runs[0][1]),
                  "decode_tps": max(tps), "decode_tps_median": sorted(tps)[len(tps) // 2],
                  "long_ttft": sorted(long_ttft)[len(long_ttft) // 2],
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def single_process(model: Path, ids: list[int], tokens: int, *, repeats: int = 3,
                   long_ids: list[int] | None = None, dtype: str | None = None,
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """Single-process mlx_lm: best and median decode tokens/s of ``repeats`` runs, median time to
    first token, and the median time to first token of ``long_ids`` (the long prompt); ``dtype``
    casts the weights (e.g. float32), ``env`` is the process's environment (e.g. a BLAS preloaded)."""
    args = [str(model), json.dumps(ids), str(tokens), str(repeats), json.dumps(long_ids or ids), *([dtype] if dtype else [])]
    out = subprocess.run([sys.executable, "-c", SINGLE_PROCESS, *args], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stream_completion(node: ExoProcess, ids: list[int], tokens: int) -> dict[str, float]:
    """One streamed completion: time to first token, decode tokens/s, tokens (from usage)."""
    body = {"model": "bench", "prompt": ids, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    client = HttpClient(node.api_url, token=node.secret, timeout=300)
    start = time.perf_counter()
    response = client.open("POST", "/v1/completions", body=body)
    first = last = None
    count = 0
    for data in sse.data(response.lines()):
        if data.get("usage"):
            count = data["usage"]["completion_tokens"]
        elif data.get("choices") and data["choices"][0]["text"]:
            last = time.perf_counter()
            first = first or last
    assert first is not None and last is not None and count > 1
    # Text arrives per token except where a character spans tokens; the usage count is exact.
    return {"ttft": first - start, "tokens": count, "decode_tps": (count - 1) / (last - first), "wall": last - start}


def aggregate(node: ExoProcess, ids: list[int], tokens: int, concurrent: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        results = list(pool.map(lambda _: stream_completion(node, ids, tokens), range(concurrent)))
    return sum(r["tokens"] for r in results) / (time.perf_counter() - start)


def hop_latency(shards: list[dict[str, Any]], *, secret: str, pings: int = 200) -> float:
    """Median one-way latency (half a PING/PONG round trip) from this process to each stage
    server, in seconds: the network and event-loop cost of one hop, without any compute. Each
    connection opens with the cluster's data-path HELLO, as a peer stage's would."""
    import asyncio

    from reconciler.datapath.wire import Frame, Kind, hello_frame, open_connection, read_frame, write_frame

    async def measure(endpoint: str) -> list[float]:
        host, _, port = endpoint.rpartition(":")
        reader, writer = await open_connection(host, int(port), timeout_s=3.0)
        samples = []
        try:
            write_frame(writer, hello_frame(data_path_token(secret)))
            for _ in range(pings):
                start = time.perf_counter()
                write_frame(writer, Frame(Kind.PING, 0))
                await read_frame(reader)
                samples.append((time.perf_counter() - start) / 2)
        finally:
            writer.close()
        return samples

    async def run() -> list[float]:
        samples: list[float] = []
        for shard in shards:
            samples += await measure(shard["status"]["dataEndpoint"])
        return samples

    return statistics.median(asyncio.run(run()))


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def pipeline(model: Path, ids: list[int], *, stages: int, tokens: int, concurrent_tokens: int,
             root: Path, long_ids: list[int], repeats: int = 3, concurrency: tuple[int, ...] = (1, 2, 4),
             pings: int = 200, rounds: int = 5) -> dict[str, Any]:
    """One fresh cluster of ``stages`` nodes. Besides its own runs, ``rounds`` paired rounds each
    run single-process mlx_lm and then the cluster, back to back, on the same prompt: the median of
    their per-token differences is the cluster's added cost with the machine's drift cancelled
    (single runs here swing by several ms a token from one minute to the next)."""
    cluster = start_cluster(stages, root / f"stages{stages}")
    try:
        wait_nodes_ready(cluster, stages)
        entry = cluster.nodes[0]
        baseline = {n.name: rss(n.proc.pid) for n in cluster.nodes}
        apply(entry, "bench", model)
        shards = wait_serving(entry, "bench", stages=stages, timeout=120)
        hop = hop_latency(shards, secret=cluster.secret, pings=pings)
        stream_completion(entry, ids, 8)  # warm-up
        runs = [stream_completion(entry, ids, tokens) for _ in range(repeats)]
        best = max(runs, key=lambda r: r["decode_tps"])
        long_ttft = statistics.median(stream_completion(entry, long_ids, 2)["ttft"] for _ in range(repeats))
        result: dict[str, Any] = {
            "stages": stages, "hop_ms_ping": hop * 1000, "ttft": statistics.median(r["ttft"] for r in runs),
            "decode_tps": best["decode_tps"], "decode_tps_median": statistics.median(r["decode_tps"] for r in runs),
            "tokens": best["tokens"], "long_ttft": long_ttft,
            "layers": [f"{s['spec']['layers']['start']}-{s['spec']['layers']['end'] - 1}" for s in shards],
            "stage_nodes": [s["spec"]["nodeName"] for s in shards],
            "aggregate_tps": {c: aggregate(entry, ids, concurrent_tokens, c) for c in concurrency},
        }
        paired = []
        for _ in range(rounds):
            alone = single_process(model, ids, tokens, repeats=1)["decode_tps"]
            paired.append((1 / stream_completion(entry, ids, tokens)["decode_tps"] - 1 / alone) * 1000)
        result["paired_added_ms"] = sorted(paired)
        result["paired_added_ms_median"] = statistics.median(paired)
        result["peak_rss"] = {n.name: peak_rss(n.proc.pid) for n in cluster.nodes}
        result["baseline_rss"] = baseline
        return result
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrent-tokens", type=int, default=48)
    parser.add_argument("--model", choices=("tiny", "small"), default="small")
    parser.add_argument("--stages", default="1,2,3", help="stage counts to run, e.g. 1,2")
    parser.add_argument("--long-prompt", type=int, default=1024, help="ids in the time-to-first-token prompt")
    parser.add_argument("--rounds", type=int, default=5,
                        help="paired rounds (single process, then the cluster) per stage count")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 stages, a few tokens")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds: must be at least 1")
    if args.smoke:
        model, stage_counts, tokens, concurrent_tokens, long_prompt = build_model("tiny"), (2,), 6, 4, 48
        options: dict[str, Any] = {"repeats": 1, "concurrency": (1, 2), "pings": 20, "rounds": 1}
    else:
        model, stage_counts = build_model(args.model), tuple(int(n) for n in args.stages.split(","))
        tokens, concurrent_tokens, long_prompt = args.tokens, args.concurrent_tokens, args.long_prompt
        options = {"rounds": args.rounds}
    if 2 not in stage_counts:
        parser.error("--stages: must include 2 (the figures compare 2 stages with one process)")
    from mlx_lm.utils import load_tokenizer

    ids = list(load_tokenizer(model).encode(PROMPT))
    long_ids = (ids * (long_prompt // len(ids) + 1))[:long_prompt]
    report: dict[str, Any] = {"model": model.name, "prompt_tokens": len(ids), "long_prompt_tokens": len(long_ids),
                              "single": single_process(model, ids, tokens, repeats=options.get("repeats", 3),
                                                       long_ids=long_ids)}
    print(json.dumps(report), flush=True)
    with tempfile.TemporaryDirectory(prefix="exo-bench-pipeline-") as tmp:
        report["pipelines"] = []
        for stages in stage_counts:
            report["pipelines"].append(pipeline(model, ids, stages=stages, tokens=tokens,
                                                concurrent_tokens=concurrent_tokens, root=Path(tmp),
                                                long_ids=long_ids, **options))
            print(json.dumps(report["pipelines"][-1]), flush=True)
    single = report["single"]
    by_stages = {p["stages"]: p for p in report["pipelines"]}
    per_token = {k: 1 / p["decode_tps"] for k, p in by_stages.items()}
    if 1 in per_token:
        report["hop_ms_derived"] = {k: (per_token[k] - per_token[1]) / (k - 1) * 1000 for k in by_stages if k > 1}
    report["ratio_2stage_vs_single"] = by_stages[2]["decode_tps"] / single["decode_tps"]
    report["added_ms_per_token"] = {k: (1 / p["decode_tps"] - 1 / single["decode_tps"]) * 1000 for k, p in by_stages.items()}
    report["paired_added_ms_per_token"] = {k: p["paired_added_ms_median"] for k, p in by_stages.items()}
    report["long_ttft_ratio_2stage"] = by_stages[2]["long_ttft"] / single["long_ttft"]
    report["rss_ratio_2stage"] = {n: v / single["peak_rss"] for n, v in by_stages[2]["peak_rss"].items()}
    print(json.dumps(report, indent=1))
    print_table(_title(report, tokens), ["", "single mlx_lm", *(f"{k} stage(s)" for k in by_stages)],
                _rows(single, by_stages))
    return 0


def _title(report: dict[str, Any], tokens: int) -> str:
    return (f"pipeline: {report['model']} model, {tokens} greedy tokens, prompt {report['prompt_tokens']} ids, "
            f"2 stages / single = {report['ratio_2stage_vs_single']:.2f}x, "
            f"{report['added_ms_per_token'][2]:+.2f} ms/token (paired rounds, median: "
            f"{report['paired_added_ms_per_token'][2]:+.2f}); {report['long_prompt_tokens']}-id prompt TTFT "
            f"{report['long_ttft_ratio_2stage']:.2f}x single")


def _rows(single: dict[str, Any], by_stages: dict[int, dict[str, Any]]) -> list[list[str]]:
    mib = 1 << 20
    pipes = list(by_stages.values())
    return [
        ["decode tokens/s (best, median)", f"{single['decode_tps']:.2f} ({single['decode_tps_median']:.2f})",
         *(f"{p['decode_tps']:.2f} ({p['decode_tps_median']:.2f})" for p in pipes)],
        ["ms per token, best run (over single's best)", f"{1000 / single['decode_tps']:.2f}",
         *(f"{1000 / p['decode_tps']:.2f} ({1000 / p['decode_tps'] - 1000 / single['decode_tps']:+.2f})" for p in pipes)],
        ["ms per token over single, paired rounds: median (range)", "-",
         *(f"{p['paired_added_ms_median']:+.2f} ({p['paired_added_ms'][0]:+.2f} to "
           f"{p['paired_added_ms'][-1]:+.2f}, {len(p['paired_added_ms'])} rounds)" for p in pipes)],
        ["time to first token", f"{single['ttft']:.2f} s", *(f"{p['ttft']:.2f} s" for p in pipes)],
        ["time to first token, long prompt", f"{single['long_ttft']:.2f} s",
         *(f"{p['long_ttft']:.2f} s ({p['long_ttft'] / single['long_ttft']:.2f}x)" for p in pipes)],
        ["one hop (PING/PONG / 2)", "-", *(f"{p['hop_ms_ping']:.2f} ms" for p in pipes)],
        ["peak RSS per stage process", f"{single['peak_rss'] / mib:.0f} MiB",
         *(" / ".join(f"{v / mib:.0f}" for v in p["peak_rss"].values()) + " MiB" for p in pipes)],
        ["aggregate tokens/s by concurrency", "-",
         *(" / ".join(f"{c}: {v:.2f}" for c, v in p["aggregate_tps"].items()) for p in pipes)],
    ]


if __name__ == "__main__":
    sys.exit(main())
