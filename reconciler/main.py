"""``exo``: run one node of the cluster."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
    parser.add_argument("--memory", help="memory this node advertises, e.g. 16Gi (default: what it has)")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="a label on this node's Node object (repeatable); nodeSelectors match it")
    parser.add_argument("--node-timeout", type=float, default=3.0,
                        help="seconds without a lease renewal before a node is NotReady (default 3)")
    parser.add_argument("--node-grace", type=float, default=600.0,
                        help="seconds a NotReady node may stay silent before it leaves Raft membership (default 600)")
    parser.add_argument("--no-discovery", action="store_true",
                        help="do not use mDNS; join through --peers only")
    parser.add_argument("--interface", metavar="ADDR",
                        help="address to announce on with mDNS (default: the address the node serves on)")
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


def node_options(args: argparse.Namespace) -> "NodeOptions":
    """Flags beyond the config, validated; a ConfigError names the flag."""
    from exo_ctl.api.meta import check_labels, parse_quantity
    from reconciler.node import NodeOptions

    memory = None
    if args.memory:
        try:
            memory = parse_quantity(args.memory)
        except ValueError as exc:
            raise ConfigError(f"--memory: {exc}") from None
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--label: {item!r} is not KEY=VALUE")
        labels[key] = value
    try:
        check_labels(labels)
    except ValueError as exc:
        raise ConfigError(f"--label: {exc}") from None
    for flag, value in (("--node-timeout", args.node_timeout), ("--node-grace", args.node_grace)):
        if value <= 0:
            raise ConfigError(f"{flag}: must be positive, got {value:g}")
    return NodeOptions(memory=memory, labels=labels, node_timeout=args.node_timeout, node_grace=args.node_grace,
                       discovery=not args.no_discovery, interface=args.interface)


async def serve(config: NodeConfig, options: "NodeOptions") -> None:
    from reconciler.node import ExoNode

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    node = ExoNode(config, options)
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
        options = node_options(args)
        if config.secret_generated:
            print_secret_hint(config)
        asyncio.run(serve(config, options))
    except (ConfigError, JoinError, OSError, ValueError) as exc:
        print(f"exo: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if lock is not None:
            lock.release()
    return 0


def run() -> None:
    """Console-script entry: exit without interpreter finalization once the node has shut down
    cleanly. MLX's per-thread state can abort the process while Python tears threads down at
    exit ("terminate called without an active exception"), which would turn a clean stop into
    exit code 134; everything worth flushing has been flushed by then."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
