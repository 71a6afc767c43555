"""``exo``: run one node of the cluster."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from reconciler.config import (DEFAULT_API_PORT, SECRET_ENV, ConfigError, DataDirLock, NodeConfig,
                               build_config)
from reconciler.membership import JoinError

log = logging.getLogger("exo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="exo", description="Run one node of an exo cluster.")
    parser.add_argument("--name", help="node name (DNS-1123 label; default: the hostname)")
    parser.add_argument("--data-dir", help="where the node keeps its identity, secret and Raft log")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--advertise-host", help="address other nodes use to reach this one "
                                                 "(default: --host, or this host's address for 0.0.0.0)")
    parser.add_argument("--api-port", type=int, default=DEFAULT_API_PORT, help="HTTP API port (default 52415)")
    parser.add_argument("--raft-port", type=int, help="Raft port (default: --api-port + 1)")
    parser.add_argument("--peers", help="HOST:API_PORT,... of existing members to join")
    parser.add_argument("--cluster-secret", help=f"cluster secret (or set {SECRET_ENV})")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    return parser.parse_args(argv)


def print_secret_hint(config: NodeConfig) -> None:
    print(
        f"exo: started a new cluster; its secret is stored in {config.data_dir / 'cluster-secret'}\n"
        f"  join other nodes:  {SECRET_ENV}=<secret> exo --peers {config.advertise_host}:{config.api_port}\n"
        f"  use exoctl:        {SECRET_ENV}=<secret> exoctl --server {config.api_url} get modeldeployments\n"
        f"  print the secret:  cat {config.data_dir / 'cluster-secret'}",
        file=sys.stderr, flush=True,
    )


async def serve(config: NodeConfig) -> None:
    from reconciler.node import ExoNode

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    node = ExoNode(config)
    try:
        starting = asyncio.create_task(node.start(), name="exo-node-start")
        stop_wait = asyncio.create_task(stopping.wait(), name="exo-stop-wait")
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # raise start-up errors
            await stop_wait
        else:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        log.info("shutting down")
    finally:
        await node.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The Raft thread and the event loop hand the GIL back and forth on every commit; the default
    # 5 ms switch interval would add up to that much to each write.
    sys.setswitchinterval(0.0005)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        logging.getLogger("pysyncobj").setLevel(logging.WARNING)
    lock: DataDirLock | None = None
    try:
        config, lock = build_config(
            name=args.name, data_dir=args.data_dir, host=args.host, advertise_host=args.advertise_host,
            api_port=args.api_port, raft_port=args.raft_port, peers=args.peers,
            secret_flag=args.cluster_secret,
        )
        if config.secret_generated:
            print_secret_hint(config)
        asyncio.run(serve(config))
    except (ConfigError, JoinError, OSError, ValueError) as exc:
        print(f"exo: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if lock is not None:
            lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
