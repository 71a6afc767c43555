"""Chaos against real ``exo`` processes: client threads apply, update, delete, get and list
ModelDeployments through the HTTP API (a write is retried with the same X-Exo-Op-Id through
any node until it gets a definite answer, as exoctl's client does), while a fault thread kills
nodes with SIGKILL — one at a time keeping quorum, or all at once (power loss). Every operation
is recorded for ``harness.chaos_history.check``.

    cluster = start_cluster(3, tmp_path)
    run = ChaosRun(cluster, seed=7)
    run.start_clients(4); run.kill_one_at_a_time(seconds=30); run.stop_clients()
    report = check(run.ops, run.final_states())
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exo_ctl.client import APPLY_CONTENT_TYPE, HttpError, Client, ClientConfig, ConnectionFailed
from harness.chaos_history import NodeState, Observed, Op
from harness.cluster import Cluster, ExoProcess

COLLECTION = "/apis/exo.dev/v1alpha1/namespaces/default/modeldeployments"
VALUE = "chaos.exo.dev/value"  # the annotation each write sets to a value of its own
# PySyncObj 0.3.17 truncates its log on every append whose prevLogIdx is below its last index,
# even when the entries match (a stale or reordered message), and logs this line when that
# throws away entries it had applied: counted, for the report.
APPLIED_TRUNCATION = "truncating already-applied log entries"
KEYS = tuple(f"chaos-{i}" for i in range(5))
WEIGHTS = {"apply": 30, "update": 20, "delete": 10, "get": 25, "list": 15}
OP_DEADLINE_S = 12.0   # a write unresolved for this long is recorded as unknown
REQUEST_TIMEOUT_S = 7.0


def chaos_seed() -> int:
    """``EXO_CHAOS_SEED`` or a new random seed, printed so a run can be replayed."""
    seed = int(os.environ.get("EXO_CHAOS_SEED") or random.randrange(1 << 30))
    print(f"chaos seed {seed} (replay with EXO_CHAOS_SEED={seed})")
    return seed


def manifest(name: str, value: str, *, resource_version: int | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default", "annotations": {VALUE: value}}
    if resource_version is not None:
        meta["resourceVersion"] = str(resource_version)
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": meta,
            "spec": {"model": {"source": "/nonexistent/chaos-model"}, "replicas": 0}}


def observed(obj: dict[str, Any]) -> Observed:
    meta = obj["metadata"]
    return Observed(int(meta["resourceVersion"]), (meta.get("annotations") or {}).get(VALUE))


@dataclass
class Attempt:
    """What one request through one node told: an answer, a definite refusal, or nothing sure."""
    answer: dict[str, Any] | None = None
    definite_error: HttpError | None = None
    not_sent: bool = False  # the connection was refused: the request never reached a node


class ChaosClient:
    """One client thread, one operation at a time. With ``sticky`` (as exoctl, pointed at one
    server) a session talks to one node; when an operation had to go elsewhere the client starts
    a new session (``c1.2``) on the node that answered. Otherwise each operation starts at a
    random node: replicas are read a few milliseconds apart, so the checker reports stale reads."""

    def __init__(self, name: str, run: "ChaosRun", rng: random.Random, *, sticky: bool = True) -> None:
        self.name, self.run, self.rng, self.sticky = name, run, rng, sticky
        self.seq = 0
        self.session = 1
        self.home = rng.randrange(len(run.cluster.nodes))
        self.last_rv: dict[str, int] = {}
        self.moved_to: int | None = None
        self.thread = threading.Thread(target=self._loop, name=f"chaos-{name}", daemon=True)

    def _client(self, node: ExoProcess) -> Client:
        return Client(ClientConfig(server=node.api_url, token=node.secret, timeout=REQUEST_TIMEOUT_S),
                      write_retries=0)

    def _attempt(self, node: ExoProcess, method: str, path: str, *, body: Any = None, content_type: str,
                 op_id: str | None) -> Attempt:
        try:
            answer, _ = self._client(node).request(method, path, body=body, content_type=content_type, op_id=op_id)
            return Attempt(answer=answer)
        except HttpError as error:
            if error.code < 500 and error.code != 429:
                return Attempt(definite_error=error)
            return Attempt()
        except ConnectionFailed as error:
            return Attempt(not_sent="connection refused" in str(error))

    def _call(self, method: str, path: str, *, body: Any = None,
              content_type: str = "application/json") -> tuple[str, dict[str, Any] | HttpError | None]:
        """("ok", answer) | ("failed", HttpError or None) | ("unknown", None). A write keeps its op id
        across retries and nodes; a read is tried once on each node at most."""
        write = method != "GET"
        op_id = uuid.uuid4().hex if write else None
        deadline = time.monotonic() + OP_DEADLINE_S
        nodes = list(self.run.cluster.nodes)
        start = self.home if self.sticky else self.rng.randrange(len(nodes))
        sent = False
        tries = 0
        while True:
            index = (start + tries) % len(nodes)
            tries += 1
            attempt = self._attempt(nodes[index], method, path, body=body, content_type=content_type, op_id=op_id)
            if tries > 1 and self.sticky:
                self.moved_to = index
            if attempt.answer is not None:
                return "ok", attempt.answer
            if attempt.definite_error is not None:
                return "failed", attempt.definite_error
            sent = sent or not attempt.not_sent
            if (not write and tries >= len(nodes)) or time.monotonic() > deadline or self.run.stopping.is_set():
                return ("unknown" if write and sent else "failed"), None
            time.sleep(self.rng.uniform(0.05, 0.25))

    def _loop(self) -> None:
        kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
        while not self.run.stopping.is_set():
            self.one(self.rng.choices(kinds, weights)[0], self.rng.choice(KEYS))

    def one(self, kind: str, key: str) -> Op:
        """Run one operation and record it."""
        started = time.monotonic()
        value = None
        if kind == "update" and key not in self.last_rv:
            kind = "apply"
        if kind in ("apply", "update"):
            self.seq += 1
            value = f"{self.name}-{self.seq}"
        if kind == "apply":
            body = json.dumps(manifest(key, value)).encode()
            outcome, answer = self._call("PATCH", f"{COLLECTION}/{key}", body=body, content_type=APPLY_CONTENT_TYPE)
        elif kind == "update":
            outcome, answer = self._call("PUT", f"{COLLECTION}/{key}",
                                         body=manifest(key, value, resource_version=self.last_rv[key]))
        elif kind == "delete":
            outcome, answer = self._call("DELETE", f"{COLLECTION}/{key}")
        elif kind == "get":
            outcome, answer = self._call("GET", f"{COLLECTION}/{key}")
            if outcome == "failed" and isinstance(answer, HttpError) and answer.code == 404:
                outcome, answer = "ok", None  # a definite "absent"
        else:
            key = None
            outcome, answer = self._call("GET", COLLECTION)
        op = self._record(kind, key, value, started, outcome, answer)
        self.run.record(op)
        if self.moved_to is not None:  # a new session on the node that answered last
            self.home, self.moved_to = self.moved_to, None
            self.session += 1
        return op

    def _record(self, kind: str, key: str | None, value: str | None, started: float, outcome: str,
                answer: Any) -> Op:
        ended = time.monotonic()
        common = dict(client=f"{self.name}.{self.session}", kind=kind, key=key, start=started, end=ended, value=value)
        if kind in ("get", "list") and outcome == "unknown":
            outcome = "failed"
        if outcome != "ok":
            return Op(**common, outcome=outcome)
        if kind == "list":
            listed = {item["metadata"]["name"]: observed(item) for item in answer["items"]}
            return Op(**common, outcome="ok", rv=int(answer["metadata"]["resourceVersion"]), listed=listed)
        if kind == "get":
            read = observed(answer) if answer is not None else None
            if read is not None:
                self.last_rv[key] = read.rv
            return Op(**common, outcome="ok", read=read)
        rv = int(answer["metadata"]["resourceVersion"])
        if kind == "delete":
            self.last_rv.pop(key, None)
        else:
            self.last_rv[key] = rv
        return Op(**common, outcome="ok", rv=rv)


@dataclass
class ChaosRun:
    cluster: Cluster
    seed: int
    log: Callable[[str], None] = print
    ops: list[Op] = field(default_factory=list)
    kills: int = 0
    power_losses: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)
    clients: list[ChaosClient] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def record(self, op: Op) -> None:
        with self._lock:
            self.ops.append(op)

    def start_clients(self, count: int, *, sticky: bool = True) -> None:
        for index in range(count):
            client = ChaosClient(f"c{index}", self, random.Random(self.seed * 1000 + index), sticky=sticky)
            self.clients.append(client)
            client.thread.start()

    def stop_clients(self) -> None:
        self.stopping.set()
        for client in self.clients:
            client.thread.join(OP_DEADLINE_S + 2 * REQUEST_TIMEOUT_S)
            assert not client.thread.is_alive(), f"client {client.name} did not stop"

    def _all_ready(self, timeout: float = 45.0) -> None:
        for node in self.cluster.nodes:
            node.wait_ready(timeout)

    def kill_one_at_a_time(self, *, seconds: float, pause: tuple[float, float] = (0.3, 1.5),
                           down: tuple[float, float] = (0.3, 2.0)) -> None:
        """For ``seconds``: SIGKILL one node (the leader half the time), keep it down a moment,
        restart it, wait until every node is ready again (so quorum is never lost), repeat."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(self.rng.uniform(*pause))
            if self.rng.random() < 0.5:
                victim = self.cluster.leader(timeout=15.0)
            else:
                victim = self.rng.choice(self.cluster.nodes)
            victim.kill()
            self.kills += 1
            self.log(f"chaos: killed {victim.name} ({self.kills})")
            time.sleep(self.rng.uniform(*down))
            victim.start()
            self._all_ready()

    def power_loss(self, *, writing: tuple[float, float] = (0.3, 2.5)) -> None:
        """Let the clients write a random while, SIGKILL every node at once, restart them all."""
        time.sleep(self.rng.uniform(*writing))
        nodes = list(self.cluster.nodes)
        self.rng.shuffle(nodes)
        for node in nodes:
            node.kill()
        self.power_losses += 1
        self.kills += len(nodes)
        self.log(f"chaos: power loss {self.power_losses}: killed {', '.join(n.name for n in nodes)}")
        for node in self.cluster.nodes:
            node.start()
        self._all_ready()

    def final_states(self, *, timeout: float = 20.0) -> dict[str, NodeState]:
        """Each node's objects once all of them serve the same (controllers may still be writing
        statuses, and leases move the revision, so objects are compared); after ``timeout`` the
        last reading, which the checker then reports as replicas-differ."""
        deadline = time.monotonic() + timeout
        while True:
            states = {node.name: self._state_of(node) for node in self.cluster.nodes}
            if None not in states.values():
                distinct = {tuple(sorted(s.objects.items())) for s in states.values()}
                if len(distinct) == 1 or time.monotonic() > deadline:
                    return states
            elif time.monotonic() > deadline:
                missing = [name for name, state in states.items() if state is None]
                raise AssertionError(f"no final state from {missing}\n{self.cluster.logs()}")
            time.sleep(0.2)

    def log_count(self, text: str) -> int:
        """How many lines of the nodes' logs contain ``text``."""
        return sum(line.count(text) for node in self.cluster.nodes for line in node.log_text().splitlines())

    @staticmethod
    def _state_of(node: ExoProcess) -> NodeState | None:
        try:
            status, _, body = node.request("GET", COLLECTION, timeout=5.0)
        except OSError:
            return None
        if status != 200:
            return None
        return NodeState(int(body["metadata"]["resourceVersion"]),
                         {item["metadata"]["name"]: observed(item) for item in body["items"]})
