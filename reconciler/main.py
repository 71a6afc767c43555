"""``exo``: run one node of the cluster."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.config import (DEFAULT_API_PORT, SECRET_ENV, ConfigError, DataDirLock, NodeConfig,
                               build_config, prepare_model_cache)
from reconciler.membership import JoinError

if TYPE_CHECKING:  # imported late at run time: the node pulls in MLX
    from reconciler.node import NodeOptions

log = logging.getLogger("exo")
SHUTDOWN_DEADLINE_S = 4.5  # from the first SIGTERM/SIGINT to the end of the process


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
    parser.add_argument("--tls", default="auto", choices=["auto", "on", "off"],
                        help="HTTPS on the API port with a certificate from the cluster CA: auto (default) when "
                             "bound beyond loopback, on, or off; stage traffic off loopback is always encrypted")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="a browser origin (https://host[:port]) allowed to call the API; repeatable "
                             "(default: same-origin only)")
    parser.add_argument("--max-concurrent-requests", type=int, default=8, metavar="N",
                        help="inference requests generating at once on this entry node (default 8)")
    parser.add_argument("--max-queued-requests", type=int, default=32, metavar="N",
                        help="inference requests waiting for a slot; beyond, 429 with Retry-After (default 32)")
    parser.add_argument("--request-idle-timeout", type=float, default=60.0, metavar="S",
                        help="seconds an inference request may make no progress before it fails (default 60)")
    parser.add_argument("--prefill-chunk", type=int, default=128, metavar="N",
                        help="prompt tokens per prefill step (default 128; larger is faster on GPUs, smaller "
                             "frees a stage sooner when a client leaves)")
    parser.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                        help="requests whose decode steps a stage runs as one batched forward (default 8; "
                             "a deployment's spec.resources.maxBatchSize wins for its shards)")
    parser.add_argument("--compute-dtype", default="auto", choices=["auto", "files", "float32"],
                        help="auto: CPU nodes time bf16 and float32 matmuls at start and widen 16-bit float "
                             "files to float32 where it is faster (GPUs keep the files' dtype); files: as "
                             "stored; float32: always widen. spec.model.dtype wins")
    parser.add_argument("--blas", default="auto", choices=["auto", "openblas", "bundled"],
                        help="Linux CPU nodes: auto/openblas restart the process once with OpenBLAS preloaded "
                             "(libopenblas0-pthread) for fast float32; bundled keeps MLX's reference BLAS")
    parser.add_argument("--model-cache", metavar="DIR",
                        help="where the node keeps the parts of models it fetched for its shards (default: "
                             "<data-dir>/models); models on this node's disk are used in place, never copied")
    parser.add_argument("--model-cache-size", metavar="SIZE",
                        help="most bytes the model cache holds, e.g. 50Gi; beyond, the least recently used models "
                             "no shard of this node needs are removed (default: no limit)")
    parser.add_argument("--weights-serve-rate", default="256Mi", metavar="RATE",
                        help="bytes per second this node serves weights to other members at most, e.g. 100Mi "
                             "(default 256Mi), so serving weights never starves inference")
    parser.add_argument("--weights-fetch-parallel", type=int, default=4, metavar="N",
                        help="byte ranges of weights this node fetches at once from peers and the hub (default 4)")
    parser.add_argument("--model-info-retention", type=float, default=3600.0, metavar="S",
                        help="as leader: delete a model's ModelInfo (its metadata and digests in the replicated "
                             "state) once no deployment, shard or node copy has referred to it for S seconds "
                             "(default 3600)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    return parser.parse_args(argv)


def print_secret_hint(config: NodeConfig) -> None:
    print(
        f"exo: started a new cluster; its secret is stored in {config.data_dir / 'cluster-secret'} "
        "(it joins nodes: give it to no client)\n"
        f"  join other nodes:  {SECRET_ENV}=<secret> exo --peers {config.advertise_host}:{config.api_port}\n"
        f"  use exoctl:        exoctl --server {config.api_url} --token \"$(cat {config.data_dir / 'admin-token'})\" "
        "get modeldeployments\n"
        f"  OpenAI clients:    base_url {config.api_url}/v1, api_key \"$(cat {config.data_dir / 'inference-token'})\"\n"
        "  more tokens:       exoctl token create --role admin|edit|view|inference [--ttl 30d]\n"
        "  (the token files appear once the node is ready)"
        + (f"\n  HTTPS clients:     trust the cluster CA {config.data_dir / 'cluster-ca.pem'} "
           "(OpenAI/httpx: verify=PATH, or SSL_CERT_FILE=PATH)" if config.https else ""),
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
    for flag, value in (("--node-timeout", args.node_timeout), ("--node-grace", args.node_grace),
                        ("--request-idle-timeout", args.request_idle_timeout),
                        ("--model-info-retention", args.model_info_retention)):
        if not value > 0:  # also NaN
            raise ConfigError(f"{flag}: must be positive, got {value:g}")
    if args.max_concurrent_requests < 1:
        raise ConfigError(f"--max-concurrent-requests: must be at least 1, got {args.max_concurrent_requests}")
    if args.prefill_chunk < 1:
        raise ConfigError(f"--prefill-chunk: must be at least 1, got {args.prefill_chunk}")
    if args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size: must be at least 1, got {args.max_batch_size}")
    if args.max_queued_requests < 0:
        raise ConfigError(f"--max-queued-requests: must be 0 or more, got {args.max_queued_requests}")
    cache_size = serve_rate = None
    try:
        cache_size = parse_quantity(args.model_cache_size) if args.model_cache_size is not None else None
    except ValueError as exc:
        raise ConfigError(f"--model-cache-size: {exc}") from None
    try:
        serve_rate = parse_quantity(args.weights_serve_rate)
    except ValueError as exc:
        raise ConfigError(f"--weights-serve-rate: {exc}") from None
    if serve_rate < 1:
        raise ConfigError(f"--weights-serve-rate: must be at least 1 byte per second, got {args.weights_serve_rate!r}")
    if args.weights_fetch_parallel < 1:
        raise ConfigError(f"--weights-fetch-parallel: must be at least 1, got {args.weights_fetch_parallel}")
    from reconciler.server.cors import parse_origin

    try:
        cors_origins = tuple(parse_origin(origin) for origin in args.cors_origin)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return NodeOptions(memory=memory, labels=labels, node_timeout=args.node_timeout, node_grace=args.node_grace,
                       discovery=not args.no_discovery, interface=args.interface, cors_origins=cors_origins,
                       max_concurrent_requests=args.max_concurrent_requests,
                       max_queued_requests=args.max_queued_requests,
                       request_idle_timeout=args.request_idle_timeout, prefill_chunk=args.prefill_chunk,
                       max_batch_size=args.max_batch_size,
                       model_cache=Path(args.model_cache).expanduser() if args.model_cache else None,
                       model_cache_size=cache_size, weights_serve_rate=serve_rate,
                       weights_fetch_parallel=args.weights_fetch_parallel,
                       model_info_retention=args.model_info_retention)


async def serve(config: NodeConfig, options: "NodeOptions") -> None:
    """Run the node until SIGTERM or SIGINT, then stop it: within SHUTDOWN_DEADLINE_S of the
    first signal the process ends whatever hangs; a second signal ends it at once."""
    from reconciler.node import ExoNode

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("%s again: exiting now, without finishing the shutdown", name)
            exit_now(1)
        log.info("%s: shutting down (exiting within %gs)", name, SHUTDOWN_DEADLINE_S)
        stopping.set()
        start_shutdown_watchdog(SHUTDOWN_DEADLINE_S)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
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
            _, pending = await asyncio.wait({starting}, timeout=1.0)
            if pending:
                log.warning("shutdown: start-up did not stop within 1s; stopping anyway")
        log.info("shutting down")
    finally:
        await node.stop()


def exit_now(code: int) -> None:
    """End the process at once (no interpreter teardown: see run())."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_shutdown_watchdog(deadline_s: float) -> None:
    """End the process ``deadline_s`` from now if the shutdown has not finished by then: a stuck
    part (a thread in a long MLX call or a download) must not keep a stopped node alive."""
    def watch() -> None:
        time.sleep(deadline_s)
        busy = sorted(t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread())
        log.error("shutdown not finished after %gs: exiting now (threads still running: %s)",
                  deadline_s, ", ".join(busy) or "none")
        exit_now(1)

    threading.Thread(target=watch, name="exo-shutdown-watchdog", daemon=True).start()


def run_event_loop(coro: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run`` without its unbounded wait for the default executor's threads at the end
    (one in a download or a Raft join would hold a stopped node's exit)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(coro)
    finally:
        try:
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.wait(leftovers, timeout=0.5))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()  # shuts the default executor down without waiting for its threads


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from reconciler.runtime.blas import BlasError, reexec_with_blas

    try:
        reexec_with_blas(args.blas)  # returns unless it restarts this process with OpenBLAS preloaded
    except BlasError as exc:
        print(f"exo: error: {exc}", file=sys.stderr, flush=True)
        return 1
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # until serve() handles it: like Ctrl-C
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
        from reconciler.tls import serves_https

        config = dataclasses.replace(config, https=serves_https(args.tls, config.host))
        options = node_options(args)
        options = dataclasses.replace(options, model_cache=prepare_model_cache(options.model_cache, config.data_dir))
        from reconciler.runtime.cpu_profile import compute_profile

        options = dataclasses.replace(options, compute=compute_profile(args.compute_dtype))
        log.info("compute: fastest float dtype %s (%s; BLAS %s; matmul ms %s)", options.compute.dtype or "not decided",
                 options.compute.source, options.compute.blas or "none", options.compute.matmulMs or "not measured")
        if config.secret_generated:
            print_secret_hint(config)
        run_event_loop(serve(config, options))
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
    exit_now(main())


if __name__ == "__main__":
    run()
