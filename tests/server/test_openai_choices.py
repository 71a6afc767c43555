"""``n`` choices of one prompt, generated concurrently, streamed and not."""
from __future__ import annotations

import json

from tests.inference.conftest import backend, client, metrics, tiny_model_dir, tokenizer, twin  # noqa: F401
from tests.inference.inference_helpers import AUTH, serve

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]


async def test_n_seeded_choices_differ_and_the_stream_carries_the_same_texts(backend):  # noqa: F811
    body = {"model": "exo/tiny", "messages": MESSAGES, "n": 3, "temperature": 1.5, "seed": 11, "max_tokens": 10}
    async with await serve(backend) as api:
        whole = await (await api.post(CHAT, headers=AUTH, json=body)).json()
        response = await api.post(CHAT, headers=AUTH, json={**body, "stream": True})
        text = await response.text()
    choices = whole["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["message"]["content"] for c in choices}) == 3
    assert whole["usage"]["completion_tokens"] == 30
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    streamed = {i: "" for i in range(3)}
    finished = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            streamed[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finished[choice["index"]] = choice["finish_reason"]
    assert streamed == {c["index"]: c["message"]["content"] for c in choices}
    assert finished == {0: "length", 1: "length", 2: "length"}


async def test_more_choices_than_the_nodes_generation_slots_is_a_400(twin):  # noqa: F811
    async with await serve(twin, max_concurrent=2) as api:
        response = await api.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES, "n": 3})
        error = (await response.json())["error"]
    assert response.status == 400 and error["param"] == "n" and "at most 2" in error["message"]


async def test_more_choices_than_the_stages_reserved_kv_cache_for_is_a_400(twin):  # noqa: F811
    twin.handles["tiny"].max_requests = 2  # as a cluster model whose shards reserve 2 requests
    async with await serve(twin, max_concurrent=8) as api:
        response = await api.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES, "n": 3})
        error = (await response.json())["error"]
        assert response.status == 400 and error["param"] == "n" and "maxConcurrentRequests" in error["message"]
        allowed = await api.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES, "n": 2})
        assert allowed.status == 200, await allowed.text()


async def test_a_failing_choice_fails_the_whole_request_with_502(client, twin):  # noqa: F811
    twin.handles["tiny"].fail_after = 2
    response = await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES, "n": 2})
    assert response.status == 502, await response.text()
