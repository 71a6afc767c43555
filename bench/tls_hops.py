"""What TLS on the data path costs: per-hop latency of a hidden state over plain TCP and over TLS
(certificates from a cluster CA, as nodes off loopback use), and decode tokens/s through two
stages both ways, on loopback.

    uv run python -m bench.tls_hops [--model DIR] [--tokens 64] [--hops 2000]
    uv run python -m bench.tls_hops --smoke
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.pipeline_hops import hop_round_trip_ms, start_echo_server
from bench.report import print_table
from reconciler.datapath import PipelineClient, StageServer
from reconciler.datapath.wire import DataPathTLS
from reconciler.tls import ClusterCA, ensure_node_certificate

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def make_tls(root: Path) -> DataPathTLS:
    return ensure_node_certificate(ClusterCA.create(), data_dir=root, node="bench",
                                   hosts=["127.0.0.1"]).data_path(loopback=True)


async def hop_ms(port: int, tls: DataPathTLS | None, *, hidden: int, rows: int, count: int) -> float:
    """Median one-way time of a bf16 [1, rows, hidden] frame: half an echo round trip."""
    return statistics.median(await hop_round_trip_ms(port, hidden=hidden, rows=rows, count=count, tls=tls)) / 2


async def decode_tps(model: Path, tls: DataPathTLS | None, tokens: int) -> float:
    from reconciler.runtime import open_shard

    servers, shards = [], []
    import json

    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    for index, (start, end) in enumerate(((0, layers // 2), (layers // 2, layers))):
        shard = await open_shard(model, start=start, end=end)
        server = StageServer(host="127.0.0.1", port=0, token="bench", tls=tls)
        server.add_shard(f"s{index}", shard)
        await server.start()
        servers.append(server)
        shards.append(shard)
    route = [s.address(f"s{i}") for i, s in enumerate(servers)]
    try:
        async with PipelineClient(token="bench", tls=tls) as client:
            async for _ in client.generate(route, PROMPT, max_tokens=4):
                pass  # warm-up: connections and handshakes
            started, count = time.perf_counter(), 0
            async for _ in client.generate(route, PROMPT, max_tokens=tokens):
                count += 1
            return count / (time.perf_counter() - started)
    finally:
        for server in servers:
            await server.stop()
        for shard in shards:
            shard.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="mlx-lm model directory (default: the built tiny model)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hops", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="a few hops and tokens")
    args = parser.parse_args()
    hops, tokens = (100, 8) if args.smoke else (args.hops, args.tokens)
    with tempfile.TemporaryDirectory() as scratch:
        tls = make_tls(Path(scratch))
        plain_port, tls_port = start_echo_server(None), start_echo_server(tls)
        rows = []
        for hidden, chunk in ((2048, 1), (8192, 1), (2048, 128)):
            plain = await hop_ms(plain_port, None, hidden=hidden, rows=chunk, count=hops)
            sealed = await hop_ms(tls_port, tls, hidden=hidden, rows=chunk, count=hops)
            rows.append([f"bf16 [1, {chunk}, {hidden}] ({chunk * hidden * 2 // 1024} KiB)",
                         f"{plain:.3f}", f"{sealed:.3f}", f"{sealed - plain:+.3f}"])
        print_table("Data path: one hop, plain TCP vs TLS (loopback, median ms)",
                    ["frame", "plain ms", "TLS ms", "TLS cost ms"], rows)
        if args.model is None:
            from exo_ctl.model_builder.build_model import build_model

            model = build_model("tiny")
        else:
            model = args.model
        best: dict[str, float] = {"plain TCP": 0.0, "TLS": 0.0}
        for _ in range(1 if args.smoke else 3):  # alternated, best of each: a shared machine is noisy
            for name, transport in (("plain TCP", None), ("TLS", tls)):
                best[name] = max(best[name], await decode_tps(model, transport, tokens))
        print_table(f"Decode through 2 stages ({model.name}, in-process stage servers, best of alternated runs)",
                    ["transport", "tokens/s"], [[name, f"{tps:.1f}"] for name, tps in best.items()])


if __name__ == "__main__":
    asyncio.run(main())
