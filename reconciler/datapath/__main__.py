"""`python -m reconciler.datapath`: serve layers [start, end) of a model as one stage process.

Prints `READY <port>` once the shard is loaded and the port is listening; SIGTERM stops it.
"""

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from reconciler.datapath.stage import StageServer
from reconciler.runtime.shard_model import ShardLoadError, load_shard


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reconciler.datapath", description="Serve layers [start, end) of a model as one pipeline stage."
    )
    parser.add_argument("--model", type=Path, required=True, help="mlx-lm model directory")
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--end", type=int, required=True)
    parser.add_argument("--shard", required=True, help="shard name used in routes")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    return parser.parse_args(argv)


async def _serve_forever(args: argparse.Namespace) -> None:
    shard = load_shard(args.model, start=args.start, end=args.end)
    server = StageServer(host=args.host, port=args.port)
    server.add_shard(args.shard, shard)
    await server.start()
    print(f"READY {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    shard.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        asyncio.run(_serve_forever(args))
    except (ShardLoadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
