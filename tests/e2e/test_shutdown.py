"""Stopping real ``exo`` processes that serve the tiny model with requests in flight: SIGTERM or
SIGINT ends every request with an error (an SSE error event, or a 503), ends open watches, and
ends the process within 5 s with code 0; a node started again at once on the same ports (their
connections still in TIME-WAIT) is ready and serves."""
from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from exo_ctl import sse
from harness.cluster import HOST, Cluster, ExoProcess, time_wait_ports
from harness.serving import DEPLOYMENTS, apply, wait_nodes_ready, wait_serving

pytestmark = pytest.mark.slow

EXIT_WITHIN_S = 5.0
LONG = 1900  # tokens: a generation still running when the signal comes (the tiny model's context is 2,048)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return build_model("tiny")


def serving_pair(exo_cluster, model_dir: Path) -> Cluster:
    """Two nodes serving the tiny model with one stage on each (Spread)."""
    cluster = exo_cluster(2)
    wait_nodes_ready(cluster, 2)
    apply(cluster.nodes[0], "tiny", model_dir)
    wait_model_serving(cluster.nodes[0])
    return cluster


def wait_model_serving(entry: ExoProcess) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            wait_serving(entry, "tiny", stages=2)
            return
        except (AssertionError, OSError) as error:  # a loaded machine can starve a node while shards load
            if not ("no quorum" in str(error) or isinstance(error, OSError)) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def body(*, stream: bool, max_tokens: int = LONG) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "stream": stream}


class Stream:
    """A streaming completion read on a thread: its JSON payloads, and when it ended."""

    def __init__(self, node: ExoProcess) -> None:
        self.connection = http.client.HTTPConnection(HOST, node.api_port, timeout=30)
        self.connection.request("POST", "/v1/completions", body=json.dumps(body(stream=True)),
                                headers={"Authorization": f"Bearer {node.secret}", "Content-Type": "application/json"})
        self.response = self.connection.getresponse()
        assert self.response.status == 200, self.response.read()
        self.payloads: list[Any] = []
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for payload in sse.data(iter(self.response.readline, b""), until_done=False, raise_errors=False):
                self.payloads.append(payload)
        finally:
            self.ended_at = time.monotonic()
            self.connection.close()

    def wait_tokens(self, count: int, *, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.payloads) < count:
            assert self.ended_at is None, f"the stream ended early: {self.payloads[-3:]}"
            assert time.monotonic() < deadline, f"only {len(self.payloads)} chunks after {timeout}s"
            time.sleep(0.01)

    def error(self, *, timeout: float) -> dict[str, Any]:
        self.thread.join(timeout)
        assert self.ended_at is not None, f"the stream still runs {timeout}s after the signal"
        errors = [p["error"] for p in self.payloads if "error" in p]
        assert errors, f"the stream ended without an error event: {self.payloads[-3:]}"
        return errors[-1]


class Watch:
    """A watch on ModelDeployments, read on a thread until the server ends it."""

    def __init__(self, node: ExoProcess) -> None:
        self.connection = http.client.HTTPConnection(HOST, node.api_port, timeout=30)
        self.connection.request("GET", f"{DEPLOYMENTS}?watch=true", headers={"Authorization": f"Bearer {node.secret}"})
        self.response = self.connection.getresponse()
        assert self.response.status == 200, self.response.read()
        self.first = json.loads(self.response.readline())
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while self.response.readline():
                pass
        except OSError:
            pass
        finally:
            self.ended_at = time.monotonic()
            self.connection.close()


class Completion:
    """A non-streaming completion waited for on a thread."""

    def __init__(self, node: ExoProcess) -> None:
        self.result: tuple[int, dict[str, str], Any] | None = None
        self.thread = threading.Thread(target=self._ask, args=(node,), daemon=True)
        self.thread.start()

    def _ask(self, node: ExoProcess) -> None:
        self.result = node.request("POST", "/v1/completions", body=body(stream=False), timeout=30)

    def answer(self, *, timeout: float) -> tuple[int, dict[str, str], Any]:
        self.thread.join(timeout)
        assert self.result is not None, f"no answer {timeout}s after the signal"
        return self.result


def wait_active_requests(node: ExoProcess, count: int, *, timeout: float = 20.0) -> None:
    """Until ``node``'s stage server holds ``count`` requests (they are past admission, generating)."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, held = node.request("GET", "/internal/v1/datapath")
        if status == 200 and held["activeRequests"] >= count:
            return
        assert time.monotonic() < deadline, f"{node.name} holds {held} after {timeout}s"
        time.sleep(0.02)


def signal_and_time_exit(node: ExoProcess, signum: int) -> tuple[float, float, int]:
    """(when the signal was sent, seconds from it to the process's end, its exit code)."""
    assert node.proc is not None
    sent = time.monotonic()
    node.proc.send_signal(signum)
    try:
        code = node.proc.wait(EXIT_WITHIN_S + 5)
    except subprocess.TimeoutExpired:
        node.kill()
        raise AssertionError(f"{node.name} still runs {EXIT_WITHIN_S + 5}s after the signal\n{node.log_text()}")
    return sent, time.monotonic() - sent, code


def idle_keepalive(node: ExoProcess) -> http.client.HTTPConnection:
    """A keep-alive connection to ``node``'s API, idle after one request: the node closes it
    when it stops, which leaves it in TIME-WAIT on the node's own port once we close our end
    (other connections end in TIME-WAIT on whichever side closed first: a race)."""
    assert not node.tls
    conn = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=5)
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    response.read()
    assert response.status == 200 and not response.will_close
    return conn


def restart_at_once(node: ExoProcess, held: http.client.HTTPConnection) -> None:
    """Start the stopped node again on the same ports, with its sockets still in TIME-WAIT."""
    held.close()
    ports = range(node.api_port, node.api_port + 3)  # api, raft, data
    deadline = time.monotonic() + 2.0
    while not (lingering := time_wait_ports(ports)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lingering, "the stop should leave connections in TIME-WAIT on the node's ports"
    started = time.monotonic()
    node.start()
    node.wait_ready()
    print(f"{node.name} ready {time.monotonic() - started:.2f}s after its restart "
          f"(TIME-WAIT on ports {sorted(lingering)})")
    assert "cannot listen" not in node.log_text()


def wait_holding_a_shard(node: ExoProcess, *, timeout: float = 30.0) -> None:
    """Until the restarted node's stage server serves its shard again (loaded from disk)."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, held = node.request("GET", "/internal/v1/datapath")
        if status == 200 and held["shards"]:
            return
        assert time.monotonic() < deadline, f"{node.name} loaded no shard after {timeout}s\n{node.log_text()}"
        time.sleep(0.1)


def assert_serves(node: ExoProcess, *, within_s: float = 20.0) -> None:
    """A completion answers, retried as the 503's Retry-After says while the restarted node's
    shards are placed again (its lease lapsed while it was down)."""
    deadline = time.monotonic() + within_s
    while True:
        status, headers, answer = node.request("POST", "/v1/completions", body=body(stream=False, max_tokens=4),
                                               timeout=30)
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(float(headers.get("Retry-After", "1")))
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_entry_node_mid_request_fails_its_requests_and_exits_within_5_s(exo_cluster, model_dir,
                                                                                     signum):
    cluster = serving_pair(exo_cluster, model_dir)
    entry, stage = cluster.nodes
    watch = Watch(entry)
    assert watch.first["type"] == "ADDED"
    waiting = Completion(entry)
    stream = Stream(entry)
    stream.wait_tokens(5)
    wait_active_requests(stage, 2)
    held = idle_keepalive(entry)

    sent, took, code = signal_and_time_exit(entry, signum)
    assert code == 0, entry.log_text()
    assert took < EXIT_WITHIN_S, entry.log_text()
    error = stream.error(timeout=1.0)
    print(f"{signal.Signals(signum).name} with 2 requests in flight: exit after {took:.2f}s, "
          f"the stream's error event after {stream.ended_at - sent:.2f}s")
    assert "shutting down" in error["message"], error
    status, headers, answer = waiting.answer(timeout=1.0)
    assert status == 503, answer
    assert "shutting down" in answer["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    assert len(stream.payloads) < LONG
    watch.thread.join(1.0)
    assert watch.ended_at is not None and watch.ended_at - sent < EXIT_WITHIN_S

    restart_at_once(entry, held)
    wait_holding_a_shard(entry)
    wait_model_serving(entry)
    assert_serves(entry)


def test_stopping_a_stage_node_mid_request_fails_the_stream_at_its_entry_at_once(exo_cluster, model_dir):
    cluster = serving_pair(exo_cluster, model_dir)
    entry, stage = cluster.nodes
    stream = Stream(entry)
    stream.wait_tokens(5)
    held = idle_keepalive(stage)

    sent, took, code = signal_and_time_exit(stage, signal.SIGTERM)
    print(f"SIGTERM to a stage node with a request in flight: exit after {took:.2f}s")
    assert code == 0, stage.log_text()
    assert took < EXIT_WITHIN_S, stage.log_text()
    error = stream.error(timeout=1.0)
    assert "generation failed" in error["message"], error
    print(f"the entry's stream failed {stream.ended_at - sent:.2f}s after the signal: {error['message']}")
    assert stream.ended_at - sent < 2.0

    restart_at_once(stage, held)
    wait_holding_a_shard(stage)
    wait_model_serving(entry)
    assert_serves(entry)


def test_a_shutdown_stuck_in_a_thread_still_ends_the_process_at_the_deadline_naming_the_thread():
    script = ("import logging, threading, time\n"
              "from reconciler.main import start_shutdown_watchdog\n"
              "logging.basicConfig()\n"
              "threading.Thread(target=time.sleep, args=(60,), name='stuck-mlx-call').start()\n"
              "start_shutdown_watchdog(0.5)\n"
              "time.sleep(60)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 20
    assert "shutdown not finished after 0.5s" in done.stderr
    assert "stuck-mlx-call" in done.stderr
