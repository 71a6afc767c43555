"""Serving under abuse (issue 9's figures), on a real 2-node cluster serving the tiny model: the
time to refuse an over-context prompt; a small request's latency alone and after clients that
left during a long prefill; SIGTERM exit time with requests in flight. Each figure is what was
measured, including "no answer within N s" where a bound is not there.

    uv run python -m bench.serving_limits [--abandoned 2] [--in-flight 4] [--patience 120]
    uv run python -m bench.serving_limits --smoke   # one of each, short patience (CI)
"""
from __future__ import annotations

import argparse
import http.client
import json
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.report import print_table
from exo_ctl import sse
from exo_ctl.http import HttpError, HttpClient
from exo_ctl.model_builder.build_model import build_model
from harness.cluster import Cluster, ExoProcess, start_cluster
from harness.serving import apply, wait_nodes_ready, wait_serving

MODEL = "limits"
SMALL_TOKENS = 8


def prompt_ids(count: int, *, vocab: int, offset: int = 0) -> list[int]:
    """Deterministic ordinary token ids (clear of the low special ids)."""
    return [10 + (offset + i * 7919) % (vocab - 20) for i in range(count)]


def _connect(node: ExoProcess, body: dict[str, Any], *, timeout: float) -> http.client.HTTPConnection:
    # Raw http.client on purpose: abandon_prefills sends and hangs up before any answer header arrives.
    conn = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=timeout)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": MODEL, **body}),
                 headers={"Authorization": f"Bearer {node.secret}", "Content-Type": "application/json"})
    return conn


def _client(node: ExoProcess, timeout: float) -> HttpClient:
    return HttpClient(node.api_url, token=node.secret, timeout=timeout)


def timed_completion(node: ExoProcess, body: dict[str, Any], *, patience: float) -> tuple[int | None, float, str]:
    """(status, seconds, first bytes of the body); status None when no answer came in time."""
    started = time.perf_counter()
    try:
        response = _client(node, patience).open("POST", "/v1/completions", body={"model": MODEL, **body}, check=False)
        text = response.read().decode(errors="replace")
        return response.status, time.perf_counter() - started, text[:4000]
    except OSError as exc:  # ConnectionFailed (a timeout included)
        return None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"


def describe(status: int | None, seconds: float, detail: str, *, patience: float) -> str:
    if status is None:
        return f"no answer within {patience:g} s ({detail})"
    message = detail
    try:
        message = json.loads(detail)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return f"{status} in {seconds:.3f} s" + (f": {message[:120]}" if status != 200 else "")


def small_request(node: ExoProcess, vocab: int, *, patience: float) -> tuple[int | None, float, str]:
    return timed_completion(node, {"prompt": prompt_ids(10, vocab=vocab), "max_tokens": SMALL_TOKENS,
                                   "temperature": 0}, patience=patience)


def abandon_prefills(node: ExoProcess, count: int, *, vocab: int, prompt_tokens: int, after: float) -> int:
    """``count`` clients send a long prompt and hang up ``after`` seconds later; how many of them
    had no token yet (so they left during prefill, not decode)."""
    conns = [_connect(node, {"prompt": prompt_ids(prompt_tokens, vocab=vocab, offset=n + 1), "max_tokens": 32,
                             "stream": True}, timeout=10) for n in range(count)]
    time.sleep(after)
    silent = 0
    for conn in conns:
        readable, _, _ = select.select([conn.sock], [], [], 0)
        silent += not readable or b"data:" not in conn.sock.recv(65536, socket.MSG_PEEK)
        conn.sock.close()
        conn.close()
    return silent


def active_requests(cluster: Cluster) -> str:
    counts = []
    for node in cluster.nodes:
        try:
            status, _, doc = node.request("GET", "/internal/v1/datapath", timeout=5.0)
        except OSError:
            status, doc = None, None
        counts.append(f"{node.name} {doc['activeRequests']}" if status == 200 else f"{node.name} ?")
    return ", ".join(counts)


class Stream(threading.Thread):
    """A streaming completion read until it ends; ``outcome`` says how it ended."""

    def __init__(self, node: ExoProcess, vocab: int, offset: int) -> None:
        super().__init__(daemon=True)
        self.node, self.body = node, {"prompt": prompt_ids(12, vocab=vocab, offset=offset), "max_tokens": 1500,
                                      "temperature": 0, "stream": True}
        self.tokens, self.outcome, self.first = 0, "running", threading.Event()

    def run(self) -> None:
        try:
            response = _client(self.node, 60).open("POST", "/v1/completions", body={"model": MODEL, **self.body},
                                                    check=False)
            if response.status != 200:
                self.outcome = f"HTTP {response.status}"
                return
            for _ in sse.data(response.lines()):
                self.tokens += 1
                self.first.set()
            self.outcome = "[DONE]"
        except sse.StreamCut:
            self.outcome = "cut without an error event"
        except HttpError as exc:
            self.outcome = "error event" if exc.code != 200 else f"bad event ({exc.message})"
        except OSError as exc:  # ConnectionFailed: reset or timed out
            self.outcome = f"{type(exc).__name__}"
        finally:
            self.first.set()


def sigterm_exit(node: ExoProcess, *, patience: float) -> str:
    node.proc.send_signal(signal.SIGTERM)
    started = time.perf_counter()
    try:
        code = node.proc.wait(patience)
    except subprocess.TimeoutExpired:
        node.kill()
        return f"did not exit within {patience:g} s (killed)"
    return f"exited in {time.perf_counter() - started:.2f} s (code {code})"


def measure(cluster: Cluster, *, vocab: int, context: int, args: argparse.Namespace) -> list[tuple[str, str]]:
    entry, patience = cluster.nodes[0], args.patience
    rows = []
    small_request(entry, vocab, patience=patience)  # warm-up
    alone = [small_request(entry, vocab, patience=patience) for _ in range(args.repeats)]
    rows.append((f"small request alone ({SMALL_TOKENS} tokens, median of {len(alone)})",
                 describe(alone[0][0], statistics.median(a[1] for a in alone), alone[0][2], patience=patience)))
    over = context + 54
    rows.append((f"over-context prompt ({over} tokens, context {context})",
                 describe(*timed_completion(entry, {"prompt": prompt_ids(over, vocab=vocab), "max_tokens": 1},
                                            patience=patience), patience=patience)))
    rows.append((f"prompt 100 + max_tokens 10^7 (context {context})",
                 describe(*timed_completion(entry, {"prompt": prompt_ids(100, vocab=vocab), "max_tokens": 10**7},
                                            patience=patience), patience=patience)))

    long_prompt = context - 64
    silent = abandon_prefills(entry, args.abandoned, vocab=vocab, prompt_tokens=long_prompt, after=0.5)
    time.sleep(1.0)
    rows.append((f"active requests 1 s after {args.abandoned} client(s) left a {long_prompt}-token prefill "
                 f"({silent} before any token)", active_requests(cluster)))
    rows.append((f"small request after {args.abandoned} abandoned prefill(s)",
                 describe(*small_request(entry, vocab, patience=patience), patience=patience)))

    streams = [Stream(entry, vocab, offset=100 + n) for n in range(args.in_flight)]
    for stream in streams:
        stream.start()
    for stream in streams:
        stream.first.wait(patience)
    streaming = sum(s.tokens > 0 for s in streams)
    rows.append((f"SIGTERM of the entry node, {len(streams)} requests in flight ({streaming} streaming)",
                 sigterm_exit(entry, patience=patience)))
    for stream in streams:
        stream.join(10)
    outcomes = [s.outcome for s in streams]
    ended = ", ".join(f"{outcomes.count(o)}x {o}" for o in sorted(set(outcomes)))
    rows.append(("  how the in-flight requests ended", ended))
    rows.append(("SIGTERM of the other node (stage 1) afterwards", sigterm_exit(cluster.nodes[1], patience=patience)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--abandoned", type=int, default=2, help="clients that leave during prefill")
    parser.add_argument("--in-flight", type=int, default=4, help="streaming requests when SIGTERM comes")
    parser.add_argument("--repeats", type=int, default=5, help="small requests timed alone")
    parser.add_argument("--patience", type=float, default=120.0, help="seconds to wait for any one answer")
    parser.add_argument("--smoke", action="store_true", help="one of each, 10 s patience")
    args = parser.parse_args(argv)
    if args.smoke:
        args.abandoned, args.in_flight, args.repeats, args.patience = 1, 1, 1, 10.0
    model = build_model("tiny")
    config = json.loads((model / "config.json").read_text())
    vocab, context = config["vocab_size"], config["max_position_embeddings"]
    with tempfile.TemporaryDirectory(prefix="exo-bench-limits-") as tmp:
        cluster = start_cluster(2, Path(tmp))
        try:
            wait_nodes_ready(cluster, 2, timeout=60)
            apply(cluster.nodes[0], MODEL, model)
            wait_serving(cluster.nodes[0], MODEL, stages=2, timeout=120)
            rows = measure(cluster, vocab=vocab, context=context, args=args)
        except BaseException:
            print(cluster.logs(), file=sys.stderr)
            raise
        finally:
            cluster.close()
    print_table(f"serving limits: tiny model on 2 nodes (Spread), context {context}", ["what", "measured"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
