"""``exoctl demo``: a three-node cluster on this machine, serving the locally built model through a
real pipeline, until Ctrl-C.

It starts three ``exo`` processes on 127.0.0.1 (the entry node on --api-port, 52415 by default;
each node uses three consecutive ports), builds the model if missing, applies its deployment,
waits for Ready, shows the placement, streams a chat answer through all three stages, and points
exoctl's config file at the cluster so ``exoctl get nodes`` works from another terminal. On
Ctrl-C it stops the nodes and puts the config file back as it was. No network, no model hub.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import platformdirs

from exo_ctl.api.resources import KINDS
from exo_ctl.cli.common import EXIT_INTERRUPTED, EXIT_OK, CliError, Context
from exo_ctl.cli.token import create_token
from exo_ctl import sse
from exo_ctl.client import DEFAULT_TIMEOUT, Client, ClientConfig, config_path, save_config
from exo_ctl.http import HttpError, ConnectionFailed, HttpClient

HOST = "127.0.0.1"
NODES = 3
PORTS_PER_NODE = 3  # api, raft (api + 1), data (api + 2)
DEPLOYMENT = "demo"
MARKER = ".exoctl-demo"  # marks a data dir the demo created (and may wipe)
PROMPT = "Tell me about clusters of small machines."
START_TIMEOUT = 60.0
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", parents=parents, help="run a local three-node cluster serving a small model, until Ctrl-C",
        description="Start three exo nodes on 127.0.0.1, deploy the locally built model across them, stream "
                    "an answer through the pipeline, and keep serving (with exoctl configured) until Ctrl-C.")
    parser.add_argument("--api-port", type=int, default=52415,
                        help="the entry node's API port (default 52415); the nodes use the next "
                             f"{NODES * PORTS_PER_NODE - 1} ports too")
    parser.add_argument("--data-dir", type=Path, help="where the nodes keep their data and logs "
                                                      "(default: the user data dir's exo/demo)")
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny",
                        help="which local model to build and serve (default tiny)")
    parser.add_argument("--prompt", default=PROMPT, help="the chat message the demo sends")
    parser.add_argument("--max-tokens", type=int, default=48, help="length of the demo answer (default 48)")
    parser.set_defaults(handler=run)


# --- the plan (pure) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoNode:
    name: str
    api_port: int
    data_dir: Path

    @property
    def ports(self) -> range:
        return range(self.api_port, self.api_port + PORTS_PER_NODE)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.api_port}"


def plan_nodes(*, api_port: int, data_dir: Path) -> list[DemoNode]:
    """The demo's nodes: demo-0 (the entry) on ``api_port``, the others on the ports after it."""
    if not 1024 <= api_port <= 65535 - NODES * PORTS_PER_NODE:
        raise CliError(f"--api-port: must be between 1024 and {65535 - NODES * PORTS_PER_NODE}, got {api_port}")
    return [DemoNode(f"demo-{i}", api_port + i * PORTS_PER_NODE, data_dir / f"demo-{i}") for i in range(NODES)]


def deployment_manifest(model_path: Path) -> dict[str, Any]:
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": DEPLOYMENT, "namespace": "default", "labels": {"app.kubernetes.io/part-of": "demo"}},
            "spec": {"model": {"source": str(model_path), "dtype": "bfloat16"}, "replicas": 1,
                     "placement": {"strategy": "Spread"}}}


def serving_summary(entry: DemoNode, token: str, *, config_file: Path | None, dashboard_token: str) -> str:
    """``token``: the inference token OpenAI clients use; ``dashboard_token``: a view token (state and chat)."""
    lines = [f"exoctl demo: serving at {entry.url} (3 nodes, model {DEPLOYMENT!r}); press Ctrl-C to stop",
             f"  dashboard:  {entry.url}/#token={dashboard_token}"]
    if config_file is not None:
        lines.append(f"  exoctl:     configured in {config_file}; try `exoctl get nodes`, `exoctl get shards`, "
                     "`exoctl get md`")
    lines += [f"  OpenAI API: {entry.url}/v1 with api_key={token}",
              f"    curl -N {entry.url}/v1/chat/completions -H 'Authorization: Bearer {token}' "
              f"-H 'Content-Type: application/json' -d '{{\"model\": \"{DEPLOYMENT}\", \"stream\": true, "
              "\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'"]
    return "\n".join(lines)


# --- ports, data dirs, config ------------------------------------------------------------------

def port_in_use(port: int) -> bool:
    """Whether a node could not listen on ``port``, tested the way the nodes listen (SO_REUSEADDR):
    a live listener counts, the TIME-WAIT connections a stopped demo leaves behind do not."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            sock.listen()
        except OSError:
            return True
    return False


def check_ports(nodes: list[DemoNode]) -> None:
    for node in nodes:
        for port in node.ports:
            if port_in_use(port):
                hint = "is another exo node or exoctl demo running? stop it, or pass --api-port"
                raise CliError(f"port {port} on {HOST} is already in use ({node.name} needs ports "
                               f"{node.ports.start}-{node.ports.stop - 1}); {hint}")


def prepare_data_dir(data_dir: Path) -> None:
    """A fresh demo cluster each run: wipe the node dirs of an earlier demo, never anything else."""
    data_dir = data_dir.expanduser()
    if data_dir.exists() and any(data_dir.iterdir()) and not (data_dir / MARKER).exists():
        raise CliError(f"--data-dir: {data_dir} is not empty and was not made by exoctl demo; "
                       "pass an empty or new directory")
    for old in data_dir.glob("demo-*"):
        if old.is_dir():
            shutil.rmtree(old)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MARKER).write_text("made by exoctl demo; its contents are replaced on each run\n")


@dataclass
class ConfigSwap:
    """Points exoctl's config file at the demo, and puts back what was there before."""

    path: Path
    previous: bytes | None = None
    written: bytes | None = None

    def install(self, *, server: str, token: str) -> None:
        self.previous = self.path.read_bytes() if self.path.exists() else None
        save_config(server=server, token=token, path=self.path)
        self.written = self.path.read_bytes()

    def restore(self) -> str:
        if self.written is None:
            return ""
        if not self.path.exists() or self.path.read_bytes() != self.written:
            return f"left {self.path} as it is (changed while the demo ran)"
        if self.previous is None:
            self.path.unlink()
            return f"removed the demo's exoctl config {self.path}"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(self.previous)
        return f"restored your previous exoctl config {self.path}"


# --- the node processes ------------------------------------------------------------------------

def _die_with_parent() -> None:  # runs in the child before exec (Linux: no orphans if we are killed)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class DemoCluster:
    nodes: list[DemoNode]
    secret: str
    out: TextIO
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log_path(self, node: DemoNode) -> Path:
        return node.data_dir.parent / f"{node.name}.log"

    def start(self) -> None:
        """Start the nodes one by one: demo-0 forms the cluster, each other joins through it."""
        env = {**os.environ, "EXO_CLUSTER_SECRET": self.secret}
        entry = self.nodes[0]
        for node in self.nodes:
            command = [sys.executable, "-m", "reconciler.main", "--name", node.name, "--data-dir", str(node.data_dir),
                       "--host", HOST, "--api-port", str(node.api_port), "--no-discovery", "--log-level", "INFO"]
            if node is not entry:
                command += ["--peers", f"{HOST}:{entry.api_port}"]
            with open(self.log_path(node), "ab") as log, INTERRUPTS.held_off():  # started and recorded, or neither
                self.procs[node.name] = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True, preexec_fn=_die_with_parent)  # Ctrl-C reaches the demo only
            self._wait_started(node)
            print(f"  started {node.name} at {node.url} (log: {self.log_path(node)})", file=self.out, flush=True)

    def _wait_started(self, node: DemoNode) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if _poll(self.procs[node.name]) is not None:
                raise CliError(f"{node.name} exited with status {self.procs[node.name].returncode}:\n"
                               f"{self.log_tail(node)}", raw=True)
            try:
                with HttpClient(node.url, timeout=1.0).open("GET", "/readyz", check=False) as answer:
                    if answer.status == 200:
                        return
            except ConnectionFailed:
                pass
            time.sleep(0.1)
        raise CliError(f"{node.name} did not become ready in {START_TIMEOUT:.0f}s; its log: {self.log_path(node)}")

    def log_tail(self, node: DemoNode, lines: int = 15) -> str:
        try:
            text = self.log_path(node).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])

    def exited(self) -> list[str]:
        return [f"{name} (status {p.returncode})" for name, p in self.procs.items() if _poll(p) is not None]

    def stop(self) -> list[str]:
        """SIGTERM every node, wait for clean exits (SIGKILL after STOP_TIMEOUT); problems as lines."""
        for proc in self.procs.values():
            if _poll(proc) is None:
                proc.send_signal(signal.SIGTERM)
        problems, deadline = [], time.monotonic() + STOP_TIMEOUT
        for name, proc in self.procs.items():
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                problems.append(f"{name} did not stop in {STOP_TIMEOUT:.0f}s and was killed")
                continue
            if code not in (0, -signal.SIGTERM):
                problems.append(f"{name} exited with status {code}")
        return problems


# --- talking to the cluster --------------------------------------------------------------------

def wait_until_ready(client: Client, *, stages: int, out: TextIO, clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> None:
    """Until the deployment is Ready with ``stages`` Ready shards; prints progress as it changes."""
    deadline, last = clock() + READY_TIMEOUT, ""
    while True:
        deployment = client.get(KINDS["ModelDeployment"], DEPLOYMENT, namespace="default")
        shards = [s for s in client.list(KINDS["Shard"]).get("items", [])
                  if s["spec"].get("deployment") == f"default/{DEPLOYMENT}"]
        ready_shards = [s for s in shards if (s.get("status") or {}).get("phase") == "Ready"
                        and s["status"].get("observedGeneration") == s["metadata"].get("generation")]
        conditions = {c["type"]: c for c in (deployment.get("status") or {}).get("conditions", [])}
        ready = conditions.get("Ready", {})
        progress = f"  {len(ready_shards)}/{stages} shards ready ({ready.get('reason', 'Pending')})"
        if progress != last:
            print(progress, file=out, flush=True)
            last = progress
        if ready.get("status") == "True" and len(shards) == stages and len(ready_shards) == stages:
            return
        if clock() > deadline:
            raise CliError(f"deployment {DEPLOYMENT} not Ready after {READY_TIMEOUT:.0f}s: "
                           f"{ready.get('reason')}: {ready.get('message')}")
        sleep(0.25)


def stream_chat(entry: DemoNode, token: str, *, prompt: str, max_tokens: int, out: TextIO) -> None:
    """Stream a chat answer to ``out``, piece by piece as the pipeline produces it."""
    body = {"model": DEPLOYMENT, "stream": True, "max_tokens": max_tokens, "temperature": 0.7,
            "messages": [{"role": "user", "content": prompt}]}
    try:
        response = HttpClient(entry.url, token=token, timeout=DEFAULT_TIMEOUT).open("POST", "/v1/chat/completions",
                                                                                   body=body)
    except HttpError as error:
        raise CliError(f"the chat request failed: HTTP {error.code}: {error.message}") from None
    try:
        for data in sse.data(response.lines()):
            for choice in data.get("choices", []):
                out.write((choice.get("delta") or {}).get("content") or "")
                out.flush()
    except (HttpError, ConnectionFailed) as error:
        raise CliError(f"the answer stopped: {getattr(error, 'message', None) or error}") from None
    finally:
        response.close()
    out.write("\n")


def show_placement(entry: DemoNode, token: str) -> None:
    from exo_ctl.cli.main import run as exoctl

    exoctl(["--server", entry.url, "--token", token, "get", "shards", "-o", "wide"])


# --- the command -------------------------------------------------------------------------------

def run(args: argparse.Namespace, ctx: Context) -> int:
    out = sys.stdout
    data_dir = (args.data_dir or Path(platformdirs.user_data_dir("exo")) / "demo").expanduser().resolve()
    nodes = plan_nodes(api_port=args.api_port, data_dir=data_dir)
    if args.max_tokens < 1:
        raise CliError(f"--max-tokens: must be at least 1, got {args.max_tokens}")
    check_ports(nodes)
    prepare_data_dir(data_dir)
    secret = secrets.token_urlsafe(24)
    cluster = DemoCluster(nodes=nodes, secret=secret, out=out)
    config = ConfigSwap(config_path())
    INTERRUPTS.pending = None
    previous_int = signal.signal(signal.SIGINT, INTERRUPTS.handler)
    previous_term = signal.signal(signal.SIGTERM, INTERRUPTS.handler)
    serving = False
    try:
        from exo_ctl.model_builder.build_model import build_model

        print(f"exoctl demo: building the {args.size} model if missing...", file=out, flush=True)
        model_path = build_model(args.size)
        print(f"exoctl demo: starting {NODES} nodes on {HOST} (data in {data_dir})", file=out, flush=True)
        cluster.start()
        # The secret stays here: exoctl gets an admin token, the dashboard a view one, OpenAI clients an inference one.
        root = Client(ClientConfig(server=nodes[0].url, token=secret))
        admin, view, inference = (create_token(root, role=role, description=f"exoctl demo ({role})")["token"]
                                  for role in ("admin", "view", "inference"))
        client = Client(ClientConfig(server=nodes[0].url, token=admin))
        client.apply(KINDS["ModelDeployment"], deployment_manifest(model_path))
        print(f"exoctl demo: applied modeldeployment {DEPLOYMENT} (Spread over the nodes); waiting for Ready",
              file=out, flush=True)
        wait_until_ready(client, stages=NODES, out=out)
        print("exoctl demo: placement", file=out, flush=True)
        show_placement(nodes[0], admin)
        print(f"exoctl demo: asking {DEPLOYMENT!r}: {args.prompt}", file=out, flush=True)
        print("(the demo model has random weights, so its answer is word salad; every token went through "
              "all three nodes)", file=out, flush=True)
        stream_chat(nodes[0], inference, prompt=args.prompt, max_tokens=args.max_tokens, out=out)
        config.install(server=nodes[0].url, token=admin)
        serving = True  # before the summary: a Ctrl-C right after it still counts as a clean stop
        print(serving_summary(nodes[0], inference, config_file=config.path, dashboard_token=view), file=out, flush=True)
        reported: set[str] = set()
        with INTERRUPTS.held_off():  # Ctrl-C and SIGTERM end the loop, and it ends in KeyboardInterrupt
            while INTERRUPTS.pending is None:
                for gone in set(cluster.exited()) - reported:
                    print(f"exoctl demo: warning: node {gone} exited; see its log in {data_dir}", file=out,
                          flush=True)
                    reported.add(gone)
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C or SIGTERM must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _say(out, "\nexoctl demo: stopping the nodes...")
        problems = cluster.stop()
        restored = config.restore()
        for line in problems + ([restored] if restored else []):
            _say(out, f"exoctl demo: {line}")
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
    _say(out, f"exoctl demo: stopped {len(cluster.procs)} nodes")
    return EXIT_OK if serving and not problems else (EXIT_INTERRUPTED if not serving else 1)


def _poll(proc: subprocess.Popen[bytes]) -> int | None:
    """``proc.poll()`` with Ctrl-C and SIGTERM held off until it returns. CPython's poll takes its
    waitpid lock before its ``try``, so a KeyboardInterrupt raised there would leave the lock held
    and every later ``wait()`` of that process hung (a demo that never stops its nodes)."""
    with INTERRUPTS.held_off():
        return proc.poll()


class Interrupts:
    """Ctrl-C and SIGTERM as KeyboardInterrupt, except inside ``held_off()``: there the signal is
    recorded and raised when the block ends. Python runs signal handlers in the main thread at any
    bytecode, so this holds whichever thread the signal reached."""

    def __init__(self) -> None:
        self.held = 0
        self.pending: int | None = None

    def handler(self, signum: int, frame: Any) -> None:
        if self.held:
            self.pending = signum
            return
        raise KeyboardInterrupt

    @contextmanager
    def held_off(self) -> Iterator[None]:
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
        if not self.held and self.pending is not None:
            self.pending = None
            raise KeyboardInterrupt


INTERRUPTS = Interrupts()


def _say(out: Any, line: str) -> None:
    """Print during shutdown; a closed terminal or pipe must not stop the nodes' cleanup."""
    try:
        print(line, file=out, flush=True)
    except OSError:
        pass
