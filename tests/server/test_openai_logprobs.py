"""``logprobs`` in chat and text completions, streamed and not, from the real tiny model."""
from __future__ import annotations

import json

from tests.inference.conftest import backend, tiny_model_dir, tokenizer  # noqa: F401
from tests.inference.inference_helpers import AUTH, serve

MESSAGES = [{"role": "user", "content": "Count to five."}]


async def _post(api, path: str, body: dict):
    response = await api.post(path, headers=AUTH, json={"model": "exo/tiny", "max_tokens": 8, **body})
    assert response.status == 200, await response.text()
    if not body.get("stream"):
        return await response.json()
    lines = [line for line in (await response.text()).splitlines() if line.startswith("data: ")]
    return [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]


async def test_chat_logprobs_name_each_token_with_its_top_alternatives_streamed_or_not(backend):  # noqa: F811
    body = {"messages": MESSAGES, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    async with await serve(backend) as api:
        whole = await _post(api, "/v1/chat/completions", body)
        chunks = await _post(api, "/v1/chat/completions", {**body, "stream": True})
    choice = whole["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == whole["usage"]["completion_tokens"] == 8
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    for entry in entries:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy draws the likeliest
        assert [t["logprob"] for t in entry["top_logprobs"]] == sorted((t["logprob"] for t in entry["top_logprobs"]),
                                                                       reverse=True)
        assert bytes(entry["bytes"]).decode() == entry["token"]
    streamed = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert streamed == entries


async def test_without_logprobs_the_choice_says_null(backend):  # noqa: F811
    async with await serve(backend) as api:
        whole = await _post(api, "/v1/chat/completions", {"messages": MESSAGES})
    assert whole["choices"][0]["logprobs"] is None


async def test_completion_logprobs_are_parallel_lists_with_text_offsets(backend):  # noqa: F811
    body = {"prompt": "One, two,", "temperature": 0, "logprobs": 2}
    async with await serve(backend) as api:
        whole = await _post(api, "/v1/completions", body)
        chunks = await _post(api, "/v1/completions", {**body, "stream": True})
    choice = whole["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]).lstrip() == choice["text"]  # the detokenizer drops a leading space
    assert len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 8
    assert all(len(top) <= 2 and max(top.values()) == lp
               for top, lp in zip(logprobs["top_logprobs"], logprobs["token_logprobs"]))
    assert logprobs["text_offset"] == [sum(map(len, logprobs["tokens"][:i])) for i in range(8)]
    streamed = [t for c in chunks for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    assert streamed == logprobs["tokens"]
