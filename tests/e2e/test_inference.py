"""The inference data path through real ``exo`` processes on 127.0.0.1: the official ``openai``
client against a 3-node cluster, greedy ids through 1, 2 and 3 stages equal to single-process
mlx_lm, concurrent requests, KV caches freed, and a stage killed mid-request."""
from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from reconciler.datapath.pipeline import PipelineClient
from reconciler.inference.cluster import ready_routes
from reconciler.node import data_path_token
from harness.cluster import Cluster, ExoProcess, start_cluster
from harness.serving import (DEPLOYMENTS, Reference, apply, client_for, node_named, shards_of, wait_nodes_ready,
                               wait_serving)

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}]
MAX_TOKENS = 24
STAGES = {"single": 1, "pair": 2, "spread": 3}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return build_model("tiny")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    """Three nodes (node1 and node2 labelled group=pair) serving the tiny model three ways: Pack on
    one node, Spread over the pair, Spread over all three; and a deployment whose files are missing."""
    cluster = start_cluster(1, tmp_path_factory.mktemp("inference"))
    try:
        for _ in range(2):
            cluster.add_node(extra_args=["--label", "group=pair"])
        wait_nodes_ready(cluster, 3)
        entry = cluster.nodes[0]
        apply(entry, "single", model_dir, strategy="Pack")
        apply(entry, "pair", model_dir, selector={"group": "pair"})
        apply(entry, "spread", model_dir)
        apply(entry, "missing", model_dir.parent / "no-such-model")
        for name, stages in STAGES.items():
            wait_serving(entry, name, stages=stages)
        yield cluster
    finally:
        cluster.close()
        print(cluster.logs())


def stage_node(cluster: Cluster, deployment: str, index: int) -> ExoProcess:
    return node_named(cluster, shards_of(cluster.nodes[0], deployment)[index]["spec"]["nodeName"])


def datapath(node: ExoProcess) -> dict:
    status, _, body = node.request("GET", "/internal/v1/datapath")
    assert status == 200, body
    return body


def wait_datapath_idle(cluster: Cluster, *, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        held = {n.name: datapath(n) for n in cluster.nodes if n.running}
        if all(d["activeRequests"] == 0 and d["kvCaches"] == 0 for d in held.values()):
            return
        assert time.monotonic() < deadline, f"stage servers still hold requests: {held}"
        time.sleep(0.05)


def pipeline_ids(node: ExoProcess, deployment: str, prompt_ids: list[int], max_tokens: int,
                 eos: set[int]) -> list[int]:
    """Token ids straight from the stage servers of the real nodes, along the route the API uses."""
    _, _, deployed = node.request("GET", f"{DEPLOYMENTS}/{deployment}")
    routes = ready_routes(deployed, shards_of(node, deployment))
    assert len(routes) == 1 and len(routes[0]) == STAGES[deployment]

    async def run() -> list[int]:
        async with PipelineClient(token=data_path_token(node.secret)) as client:
            tokens = client.generate(routes[0], prompt_ids, max_tokens=max_tokens, stop_ids=eos)
            async with contextlib.aclosing(tokens):
                return [token async for token in tokens]

    return asyncio.run(run())


@pytest.mark.parametrize("deployment", list(STAGES))
def test_greedy_decoding_through_each_pipeline_depth_equals_single_process_mlx_lm(cluster, reference, deployment):
    prompt_ids = reference.chat_ids(MESSAGES)
    expected = reference.greedy(prompt_ids, MAX_TOKENS)
    assert len(expected) >= 8, "the reference should say something"
    eos = set(reference.tokenizer.eos_token_ids)
    assert pipeline_ids(cluster.nodes[0], deployment, prompt_ids, MAX_TOKENS, eos) == expected
    # The API of every node, whatever it holds, answers with the same tokens' text and count.
    for node in cluster.nodes:
        reply = client_for(node).chat.completions.create(model=deployment, messages=MESSAGES,
                                                         max_tokens=MAX_TOKENS, temperature=0)
        assert reply.choices[0].message.content == reference.text(expected)
        assert reply.usage.prompt_tokens == len(prompt_ids)
        assert reply.usage.completion_tokens == len(expected)
        assert reply.choices[0].finish_reason == ("length" if len(expected) == MAX_TOKENS else "stop")


def test_the_openai_client_streams_through_three_stages_entering_at_the_middle_one(cluster, reference):
    middle = stage_node(cluster, "spread", 1)
    prompt_ids = reference.chat_ids(MESSAGES)
    expected = reference.greedy(prompt_ids, MAX_TOKENS)
    stream = client_for(middle).chat.completions.create(model="spread", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.text(expected)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length" if len(expected) == MAX_TOKENS else "stop"]
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(prompt_ids), len(expected))


def test_a_node_holding_no_shard_of_a_model_serves_it_through_the_others(cluster, reference):
    entry = cluster.nodes[0]
    assert all(s["spec"]["nodeName"] != entry.name for s in shards_of(entry, "pair"))
    prompt = "The river runs"
    ids = reference.tokenizer.encode(prompt)
    expected = reference.text(reference.greedy(ids, MAX_TOKENS))
    reply = client_for(entry).completions.create(model="pair", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].text == expected
    streamed = client_for(entry).completions.create(model="pair", prompt=prompt, max_tokens=MAX_TOKENS,
                                                    temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_models_lists_every_deployment_with_its_state(cluster):
    listing = client_for(cluster.nodes[2]).models.list()
    cards = {m.id: m.model_extra for m in listing.data}
    assert sorted(cards) == ["missing", "pair", "single", "spread"]
    assert all(cards[name]["ready"] and cards[name]["state"] == "Ready" for name in STAGES)
    assert cards["missing"]["ready"] is False
    assert "ModelNotFound" in cards["missing"]["state"]


def test_unknown_model_bad_request_and_not_ready_get_openai_errors(cluster):
    node = cluster.nodes[1]
    client = client_for(node)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="spread", messages=MESSAGES, temperature=-1)
    assert bad.value.param == "temperature"
    status, headers, body = node.request("POST", "/v1/chat/completions",
                                         body={"model": "missing", "messages": MESSAGES})
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "model_not_ready"
    assert "ModelNotFound" in body["error"]["message"]


def test_concurrent_requests_get_the_same_answers_as_sequential_ones(cluster, reference):
    prompts = ["Once upon a time", "The capital of France", "Numbers: one, two,", "A quiet evening in"]
    expected = [reference.text(reference.greedy(reference.tokenizer.encode(p), MAX_TOKENS)) for p in prompts]
    assert len(set(expected)) == len(prompts), "distinct prompts should give distinct answers"
    entries = [cluster.nodes[i % 3] for i in range(len(prompts))]

    def ask(index: int) -> str:
        reply = client_for(entries[index]).completions.create(model="spread", prompt=prompts[index],
                                                              max_tokens=MAX_TOKENS, temperature=0)
        return reply.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, range(len(prompts)))) == expected
    wait_datapath_idle(cluster)


def test_kv_caches_are_freed_when_requests_finish_or_clients_leave(cluster):
    client_for(cluster.nodes[0]).completions.create(model="spread", prompt="Hello", max_tokens=8, temperature=0)
    wait_datapath_idle(cluster)
    stream = client_for(cluster.nodes[1]).completions.create(model="spread", prompt="Hello", max_tokens=2000,
                                                             temperature=0, stream=True)
    received = 0
    for _ in stream:
        received += 1
        if received == 5:
            break
    held = [datapath(n) for n in cluster.nodes]
    assert [d["activeRequests"] for d in held] == [1, 1, 1], held
    assert [d["kvCaches"] for d in held] == [1, 1, 1], held
    stream.close()  # the client leaves mid-stream
    wait_datapath_idle(cluster)


def test_a_stage_killed_mid_request_ends_the_stream_with_an_error_and_the_model_recovers(exo_cluster, model_dir,
                                                                                         reference):
    cluster = exo_cluster(3)
    wait_nodes_ready(cluster, 3)
    apply(cluster.nodes[0], "spread", model_dir)
    shards = wait_serving(cluster.nodes[0], "spread", stages=3)
    entry, middle = node_named(cluster, shards[0]["spec"]["nodeName"]), node_named(cluster, shards[1]["spec"]["nodeName"])
    stream = client_for(entry).completions.create(model="spread", prompt="Hello", max_tokens=2000, temperature=0,
                                                  stream=True)
    received, killed_at = 0, None
    with pytest.raises(openai.APIError) as failure:
        for _ in stream:
            received += 1
            if received == 5:
                middle.kill()
                killed_at = time.monotonic()
    assert killed_at is not None
    assert time.monotonic() - killed_at < 5.0
    assert "generation failed" in failure.value.message
    assert received < 2000

    wait_serving(entry, "spread", stages=2, avoid=middle.name, timeout=40.0)
    prompt_ids = reference.chat_ids(MESSAGES)
    reply = client_for(entry).chat.completions.create(model="spread", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                      temperature=0)
    assert reply.choices[0].message.content == reference.text(reference.greedy(prompt_ids, MAX_TOKENS))
