"""Re-placement is make-before-break: three real ``exo`` nodes serve the tiny model (Spread), and
streams keep running while a fourth node joins and the model is placed again over four. The old
placement keeps serving until the new one is Ready, its streams in flight finish on it, and no
request sees an error; afterwards the deployment is Ready on the four nodes."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import start_cluster
from harness.serving import DEPLOYMENTS, apply, client_for, shards_of, wait_nodes_ready, wait_serving

pytestmark = pytest.mark.slow

STREAM_TOKENS = 300  # 8-20 s each here; back to back, one is always in flight
CLIENTS = 2  # back to back in each, so a stream is always in flight when the placements swap


class Streams(threading.Thread):
    """One client streaming completions back to back until stopped; records each one."""

    def __init__(self, node: Any) -> None:
        super().__init__(daemon=True)
        self.node, self.stopped = node, threading.Event()
        self.done: list[tuple[float, float, int, str]] = []  # started, ended, tokens, finish reason
        self.errors: list[str] = []
        self.tokens = 0  # of the stream running now
        self.keep_before = float("inf")

    def stop(self, *, keep_before: float) -> None:
        """Stop after the stream in flight if that began before ``keep_before`` (time.monotonic());
        one that began later is after what the test looks at, and the client leaves it at once."""
        self.keep_before = keep_before
        self.stopped.set()

    def run(self) -> None:
        client = client_for(self.node, timeout=120)
        while not self.stopped.is_set():
            started, self.tokens, reason = time.monotonic(), 0, ""
            try:
                with client.completions.create(model="tiny", prompt="Once upon", max_tokens=STREAM_TOKENS,
                                               temperature=0, stream=True) as stream:
                    for chunk in stream:
                        if self.stopped.is_set() and started >= self.keep_before:
                            return
                        self.tokens += 1
                        reason = chunk.choices[0].finish_reason or reason
            except Exception as error:  # noqa: BLE001 — any failure is what this test looks for
                self.errors.append(f"{type(error).__name__}: {error} after {self.tokens} tokens")
                return
            self.done.append((started, time.monotonic(), self.tokens, reason))


def test_a_fourth_node_joining_interrupts_no_stream_and_the_model_ends_ready_on_four(tmp_path: Path) -> None:
    from exo_ctl.model_builder.build_model import build_model

    model = build_model("tiny")
    cluster = start_cluster(3, tmp_path, extra_args=("--memory", "16Gi"))
    try:
        entry = cluster.nodes[0]
        wait_nodes_ready(cluster, 3)
        apply(entry, "tiny", model)
        old = wait_serving(entry, "tiny", stages=3, timeout=60)
        old_names = {s["metadata"]["name"] for s in old}
        clients = [Streams(entry) for _ in range(CLIENTS)]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 30
        while not all(c.tokens >= 20 for c in clients) and not any(c.errors for c in clients):
            assert time.monotonic() < deadline, "the streams did not start on three nodes"
            time.sleep(0.05)
        joined = time.monotonic()
        cluster.add_node(extra_args=("--memory", "16Gi"))
        old_gone = None
        deadline = time.monotonic() + 90
        while True:
            shards = shards_of(entry, "tiny")
            names = {s["metadata"]["name"] for s in shards}
            if old_gone is None and not names & old_names:
                old_gone = time.monotonic()
            if old_gone is not None:
                break
            assert not any(c.errors for c in clients), [c.errors for c in clients]
            assert time.monotonic() < deadline, f"the old placement was never removed: {sorted(names)}\n{cluster.logs()}"
            time.sleep(0.05)
        new = wait_serving(entry, "tiny", stages=4, timeout=60)
        ready_on_four = time.monotonic() - joined
        spanning = time.monotonic() + 120
        # Keep streaming until a stream that began before the old placement left has finished.
        while not any(s < old_gone < e for c in clients for s, e, _, _ in c.done) and not any(c.errors for c in clients):
            assert time.monotonic() < spanning, "no stream spanned the swap of placements"
            time.sleep(0.1)
        for client in clients:
            client.stop(keep_before=old_gone)  # streams begun on the new placement alone are not awaited
        for client in clients:
            client.join(120)
        errors = [e for c in clients for e in c.errors]
        assert not errors, f"{errors}\n{cluster.logs()[-30000:]}"
        finished = [d for c in clients for d in c.done]
        assert all(tokens > 0 and reason in ("length", "stop") for _, _, tokens, reason in finished), finished
        assert sorted(s["spec"]["nodeName"] for s in new) == sorted(n.name for n in cluster.nodes)
        status, _, md = entry.request("GET", f"{DEPLOYMENTS}/tiny")
        assert status == 200 and md["status"]["readyReplicas"] == 1
        print(f"make-before-break: join to Ready on 4 in {ready_on_four:.1f}s (old placement removed "
              f"{old_gone - joined:.1f}s after the join), {len(finished)} streams, 0 errors")
    finally:
        cluster.close()
