"""Data-path figures on loopback: per-hop latency of a hidden state, and decode tokens/s through
1/2/3 pipeline stages against single-process mlx_lm on the tiny model.

    uv run python -m bench.pipeline_hops [--model DIR] [--tokens 128]
    uv run python -m bench.pipeline_hops --smoke   # a few tokens and hops (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from bench.report import print_table
from reconciler.datapath import PipelineClient, StageAddress, StageServer
from reconciler.datapath.wire import DataPathTLS, Frame, Kind, Tensor, open_connection, read_frame, set_nodelay, write_frame
from reconciler.runtime import open_shard

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79]


def start_echo_server(tls: DataPathTLS | None = None) -> int:
    """A frame echo server on its own thread and event loop (the far end of one hop), over TLS
    when ``tls`` is given; its port."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        set_nodelay(writer)
        try:
            while True:
                write_frame(writer, await read_frame(reader))
        except ConnectionError:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=tls.server if tls else None)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True).start()
    ready.wait()
    return port[0]


async def hop_round_trip_ms(port: int, *, hidden: int, rows: int, count: int,
                            tls: DataPathTLS | None = None) -> list[float]:
    """Echo round trips of a bf16 [1, rows, hidden] frame, in ms (after 50 warm-up ones)."""
    reader, writer = await open_connection("127.0.0.1", port, timeout_s=3, tls=tls)
    frame = Frame(Kind.FORWARD, 1, tensor=Tensor("bfloat16", (1, rows, hidden), bytes(rows * hidden * 2)))
    times = []
    for i in range(count + 50):
        started = time.perf_counter()
        write_frame(writer, frame)
        await read_frame(reader)
        if i >= 50:
            times.append((time.perf_counter() - started) * 1e3)
    writer.close()
    return times


def mlx_lm_decode_tps(model_path: Path, tokens: int) -> float:
    model = load_model(model_path)[0]
    for _ in generate_step(mx.array(PROMPT), model, max_tokens=8):  # warm up, like the pipeline runs
        pass
    stamps = []
    for _ in generate_step(mx.array(PROMPT), model, max_tokens=tokens):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


async def pipeline_decode_tps(route: list[StageAddress], tokens: int, *, concurrent: int = 1) -> float:
    async with PipelineClient() as client:
        async def one(offset: int) -> tuple[int, float, float]:
            stamps = []
            prompt = [(t + offset) % 256 for t in PROMPT]
            async for _ in client.generate(route, prompt, max_tokens=tokens):
                stamps.append(time.perf_counter())
            return len(stamps) - 1, stamps[0], stamps[-1]

        await one(0)  # warm connections and compute threads
        runs = await asyncio.gather(*(one(i) for i in range(concurrent)))
    produced = sum(n for n, _, _ in runs)
    return produced / (max(end for _, _, end in runs) - min(start for _, start, _ in runs))


def splits(layers: int, stages: int) -> list[tuple[int, int]]:
    bounds = [round(i * layers / stages) for i in range(stages + 1)]
    return list(zip(bounds, bounds[1:]))


async def in_process_rows(model_path: Path, layers: int, tokens: int, *,
                          setups: tuple[tuple[int, int], ...]) -> list[tuple[str, float]]:
    rows = []
    for stages, concurrent in setups:
        servers, shards = [], []
        for i, (start, end) in enumerate(splits(layers, stages)):
            shard = await open_shard(model_path, start=start, end=end)
            server = StageServer()
            server.add_shard(f"s{i}", shard)
            await server.start()
            servers.append(server)
            shards.append(shard)
        route = [s.address(f"s{i}") for i, s in enumerate(servers)]
        tps = await pipeline_decode_tps(route, tokens, concurrent=concurrent)
        label = f"{stages} stage(s), one process" + (f", {concurrent} concurrent requests (sum)" if concurrent > 1 else "")
        rows.append((label, tps))
        for server in servers:
            await server.stop()
        for shard in shards:
            shard.close()
    return rows


async def separate_process_row(model_path: Path, layers: int, tokens: int) -> tuple[str, float]:
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "reconciler.datapath", "--model", str(model_path), "--start", str(start),
             "--end", str(end), "--shard", f"p{i}"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i, (start, end) in enumerate(splits(layers, 2))
    ]
    try:
        ports = [int(p.stdout.readline().split()[1]) for p in processes]
        route = [StageAddress(host="127.0.0.1", port=port, shard=f"p{i}") for i, port in enumerate(ports)]
        return "2 stages, separate processes", await pipeline_decode_tps(route, tokens)
    finally:
        for p in processes:
            p.terminate()
            p.wait()
            p.stdout.close()


def resolve_model(path: Path | None) -> Path:
    if path is not None:
        return path
    from exo_ctl.model_builder.build_model import build_model

    return build_model("tiny")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: exo_ctl.model_builder.build_model tiny)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="a few tokens and hops, 1 and 2 stages")
    args = parser.parse_args()
    model_path = resolve_model(args.model)
    tokens = 6 if args.smoke else args.tokens
    pings, prefill_pings = (50, 10) if args.smoke else (2000, 200)
    setups = ((1, 1), (2, 1)) if args.smoke else ((1, 1), (2, 1), (3, 1), (3, 4))
    import json

    config = json.loads((model_path / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]

    port = start_echo_server()
    hops = []
    for label, size, rows in ((f"1 x {hidden} (tiny)", hidden, 1), ("1 x 2048", 2048, 1), ("512 x 2048 (prefill)", 2048, 512)):
        count = pings if rows == 1 else prefill_pings
        times = sorted(await hop_round_trip_ms(port, hidden=size, rows=rows, count=count))
        p50, p99 = statistics.median(times), times[max(0, int(len(times) * 0.99) - 1)]
        hops.append((label, f"{p50:.3f} ms", f"{p99:.3f} ms", f"{p50 / 2:.3f} ms"))
    print_table(f"hop latency over loopback (bf16 hidden state, TCP_NODELAY), model {model_path.name}",
                ["payload", "round trip p50", "p99", "one hop ~"], hops)

    decode = [("mlx_lm generate_step, single process", f"{mlx_lm_decode_tps(model_path, tokens):.1f}")]
    for label, tps in await in_process_rows(model_path, layers, tokens, setups=setups):
        decode.append((label, f"{tps:.1f}"))
    label, tps = await separate_process_row(model_path, layers, tokens)
    decode.append((label, f"{tps:.1f}"))
    print_table(f"decode throughput, {tokens} greedy tokens, {layers} layers", ["setup", "tokens/s"], decode)


if __name__ == "__main__":
    asyncio.run(main())
