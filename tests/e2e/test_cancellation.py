"""Clients that leave, and requests that stall, free what they held on every stage: through real
``exo`` processes serving the tiny model (2,048-token context) over a two-stage pipeline."""
from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from reconciler.datapath import PREFILL_CHUNK
from harness.cluster import Cluster, ExoProcess, start_cluster
from harness.serving import apply, client_for, node_named, shards_of, wait_nodes_ready, wait_serving

pytestmark = pytest.mark.slow

LONG_PROMPT_TOKENS = 1900
IDLE_TIMEOUT_S = 1.0  # node1's --request-idle-timeout


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return build_model("tiny")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    """node0 (default idle timeout) and node1 (``--request-idle-timeout 1``) each hold one stage."""
    cluster = start_cluster(1, tmp_path_factory.mktemp("cancellation"))
    try:
        cluster.add_node(extra_args=["--request-idle-timeout", str(IDLE_TIMEOUT_S)])
        wait_nodes_ready(cluster, 2)
        apply(cluster.nodes[0], "pair", model_dir)
        wait_serving(cluster.nodes[0], "pair", stages=2)
        yield cluster
    finally:
        cluster.close()
        print(cluster.logs()[-20000:])


def datapath(node: ExoProcess) -> dict:
    status, _, body = node.request("GET", "/internal/v1/datapath")
    assert status == 200, body
    return body


def held(cluster: Cluster) -> list[tuple[int, int]]:
    return [(d["activeRequests"], d["kvCaches"]) for d in map(datapath, cluster.nodes)]


def in_flight(node: ExoProcess) -> float:
    status, _, text = node.request("GET", "/metrics")
    assert status == 200
    found = re.search(r'^exo_inference_in_flight\{model="pair"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_freed(cluster: Cluster, *, within_s: float, caches: bool = True) -> float:
    """Seconds until no stage holds a request (nor, with ``caches``, a KV cache) and no entry
    counts one in flight."""
    started = time.monotonic()
    while True:
        now = held(cluster)
        if all(r == 0 and (c == 0 or not caches) for r, c in now) and all(in_flight(n) == 0 for n in cluster.nodes):
            return time.monotonic() - started
        assert time.monotonic() - started < within_s, f"still held after {within_s}s: {now}"
        time.sleep(0.05)


def memory(cluster: Cluster) -> int:
    return sum(datapath(n)["mlxActiveMemoryBytes"] for n in cluster.nodes)


def small_request_seconds(node: ExoProcess) -> float:
    started = time.monotonic()
    reply = client_for(node, timeout=30).completions.create(model="pair", prompt="Hello there", max_tokens=8,
                                                            temperature=0)
    assert reply.usage.completion_tokens >= 1
    return time.monotonic() - started


def long_prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 4000) for _ in range(LONG_PROMPT_TOKENS)]


def abandon_during_prefill(node: ExoProcess, prompt: list[int], *, stream: bool, after_s: float,
                           outcomes: list[str]) -> None:
    """Send a long prompt and hang up before the first token (a client that gave up)."""
    body = {"model": "pair", "prompt": prompt, "max_tokens": 100, "temperature": 0, "stream": stream}

    async def run() -> str:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {node.secret}"}) as http:
            try:
                async with http.post(f"{node.api_url}/v1/completions", json=body,
                                     timeout=aiohttp.ClientTimeout(total=30, sock_read=after_s)) as response:
                    await response.content.readany()  # streams: headers come first, then nothing yet
                    return f"answered {response.status} before the client left"
            except asyncio.TimeoutError:
                return "left"

    outcomes.append(asyncio.run(run()))


def test_clients_that_leave_during_long_prefills_free_every_stage_and_the_next_request_is_not_delayed(cluster):
    entry = cluster.nodes[0]
    alone = min(small_request_seconds(entry) for _ in range(3))
    # One prefill chunk, for scale: a chunk already computing when its client leaves finishes;
    # the chunks queued behind it must not run.
    started = time.monotonic()
    client_for(entry).completions.create(model="pair", prompt=long_prompt(0)[:PREFILL_CHUNK], max_tokens=1,
                                         temperature=0)
    chunk = time.monotonic() - started
    wait_freed(cluster, within_s=5)
    before = memory(cluster)

    peak, outcomes = [0], []
    threads = [threading.Thread(target=abandon_during_prefill, args=(entry, long_prompt(seed)),
                                kwargs={"stream": seed % 2 == 0, "after_s": 0.5, "outcomes": outcomes})
               for seed in (1, 2)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        peak[0] = max(peak[0], memory(cluster))
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    assert outcomes == ["left"] * 2
    requests_freed = wait_freed(cluster, within_s=1.0, caches=False)
    after = small_request_seconds(entry)  # right away: it waits for at most the chunks computing now
    caches_freed = wait_freed(cluster, within_s=chunk + 5.0)
    after_memory = memory(cluster)
    print(f"\nsmall request alone {alone:.3f}s, after 2 abandoned {LONG_PROMPT_TOKENS}-token prefills {after:.3f}s; "
          f"one {PREFILL_CHUNK}-token chunk {chunk:.2f}s; requests freed in {requests_freed:.2f}s, KV caches "
          f"{caches_freed:.2f}s after that; MLX memory {before} -> peak {peak[0]} -> {after_memory}")
    assert peak[0] > before, "the abandoned prefills never held memory: they did not reach the stages"
    assert after_memory <= before + (1 << 20), f"{after_memory - before} bytes more than before the prefills"
    # Before: the 2 x 4 chunks of the abandoned prompts ran first.
    assert after < alone + chunk + 1.0, f"small request took {after:.2f}s after abandoned prefills"


def test_a_client_that_leaves_mid_stream_frees_the_request_within_a_second(cluster):
    stream = client_for(cluster.nodes[1]).completions.create(model="pair", prompt="Once upon", max_tokens=1500,
                                                             temperature=0, stream=True)
    for received, _ in enumerate(stream):
        if received == 4:
            break
    assert held(cluster) == [(1, 1), (1, 1)]
    stream.close()
    wait_freed(cluster, within_s=1.0)


def test_a_request_that_makes_no_progress_fails_after_the_idle_timeout_and_is_freed(cluster):
    entry = cluster.nodes[1]  # --request-idle-timeout 1
    other = cluster.nodes[0]
    assert {s["spec"]["nodeName"] for s in shards_of(entry, "pair")} == {entry.name, other.name}
    stream = client_for(entry).completions.create(model="pair", prompt="Once upon", max_tokens=1500,
                                                  temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)
    os.kill(other.proc.pid, signal.SIGSTOP)  # alive for TCP, but computes and answers nothing
    stopped = time.monotonic()
    try:
        with pytest.raises(openai.APIError) as failure:
            for _ in chunks:
                pass
        failed_after = time.monotonic() - stopped
    finally:
        os.kill(other.proc.pid, signal.SIGCONT)
    print(f"\nfailed {failed_after:.2f}s after the other stage stopped: {failure.value.message}")
    assert "no progress for 1 s" in failure.value.message
    assert failed_after < IDLE_TIMEOUT_S + 1.5  # before the heartbeat (2.5 s) declares the stage lost
    wait_freed(cluster, within_s=3.0)
    wait_serving(entry, "pair", stages=2)
    assert small_request_seconds(node_named(cluster, entry.name)) < 10
