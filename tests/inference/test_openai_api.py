"""The OpenAI-compatible API over a twin backend: formats, parameters, streaming and metrics."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.inference.inference_helpers import AUTH
from tests.inference.backend_twin import ScriptedModel

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]


def script_text(twin, count: int | None = None) -> str:
    handle = twin.handles["tiny"]
    return handle.tokenizer.decode(handle.script[:count])


async def eventually(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def read_sse(response) -> list:
    """The ``data:`` payloads of a server-sent event stream, JSON-decoded except ``[DONE]``."""
    events = []
    for block in (await response.text()).split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def test_models_are_listed_in_openai_format_with_their_state(client):
    response = await client.get("/v1/models", headers=AUTH)
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["ready"], m["state"]) for m in body["data"]] == [
        ("tiny", "model", True, "Ready"), ("big", "model", False, "Loading 2/3 shards")]
    assert body["data"][0]["served_name"] == "org/tiny" and body["data"][0]["created"] == 1700000000


async def test_one_model_is_found_by_its_served_name_and_an_unknown_one_is_404(client):
    response = await client.get("/v1/models/org/tiny", headers=AUTH)
    assert (await response.json())["id"] == "tiny"
    response = await client.get("/v1/models/nope", headers=AUTH)
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "model_not_found"


async def test_chat_completion_renders_messages_through_the_chat_template(client, twin, tokenizer):
    response = await client.post(CHAT, headers=AUTH, json={
        "model": "tiny", "messages": MESSAGES, "max_completion_tokens": 5, "temperature": 0.3, "top_p": 0.9,
        "seed": 42, "user": "someone"})
    assert response.status == 200
    body = await response.json()
    prompt_ids, params, max_tokens = twin.handles["tiny"].requests[0]
    assert prompt_ids == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert (max_tokens, params.temperature, params.top_p, params.seed) == (5, 0.3, 0.9, 42)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": script_text(twin, 5)},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 5,
                             "total_tokens": len(prompt_ids) + 5}


async def test_the_served_name_reaches_the_same_model_and_is_echoed_back(client):
    response = await client.post(CHAT, headers=AUTH, json={"model": "org/tiny", "messages": MESSAGES, "max_tokens": 2})
    assert (await response.json())["model"] == "org/tiny"


async def test_an_end_of_sequence_token_stops_with_reason_stop_and_is_not_shown(client, twin, tokenizer):
    eos = sorted(tokenizer.eos_token_ids)[0]
    twin.handles["tiny"].script[3:3] = [eos]
    body = await (await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES})).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == script_text(twin, 3)
    assert body["usage"]["completion_tokens"] == 3


async def test_a_backend_that_ends_its_stream_early_means_stop(client, twin):
    body = await (await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES,
                                                              "max_tokens": 500})).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == script_text(twin)


@pytest.mark.parametrize(("stop", "text"), [("capital", "Paris is the "), (["Seine", " capital"], "Paris is the")])
async def test_a_stop_string_ends_generation_and_is_cut_from_the_text(client, twin, stop, text):
    body = await (await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES,
                                                              "stop": stop})).json()
    assert body["choices"][0]["message"]["content"] == text
    assert body["choices"][0]["finish_reason"] == "stop"
    assert twin.handles["tiny"].cancelled.is_set()
    assert body["usage"]["completion_tokens"] < len(twin.handles["tiny"].script)


async def test_streamed_chat_sends_role_then_deltas_then_finish_reason_then_done(client, twin):
    response = await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES, "max_tokens": 6,
                                                           "stream": True})
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = await read_sse(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "usage" not in chunks[0]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == script_text(twin, 6)


async def test_stream_options_include_usage_adds_a_final_usage_chunk(client):
    response = await client.post(CHAT, headers=AUTH, json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}})
    events = await read_sse(response)
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 4
    assert all(chunk["usage"] is None for chunk in events[:-2])


async def test_streaming_never_splits_a_multibyte_character(client, twin, tokenizer):
    text = "Grüße aus Köln — 世界 🎉!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "the text must have characters split over tokens"
    twin.handles["tiny"].script = ids
    response = await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES, "stream": True})
    pieces = [c["choices"][0]["delta"].get("content", "") for c in (await read_sse(response))[:-1]]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text
    body = await (await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES})).json()
    assert body["choices"][0]["message"]["content"] == text


async def test_a_stop_string_spanning_tokens_is_held_back_in_a_stream(client, twin):
    response = await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES, "stream": True,
                                                           "stop": ["of Fr"]})
    chunks = (await read_sse(response))[:-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Paris is the capital "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_text_completion_encodes_the_prompt_with_bos_like_mlx_lm(client, twin, tokenizer):
    response = await client.post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "Once upon",
                                                                        "max_tokens": 3})
    body = await response.json()
    assert twin.handles["tiny"].requests[0][0] == tokenizer.encode("Once upon")
    assert twin.handles["tiny"].requests[0][0][0] == tokenizer.bos_token_id
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": script_text(twin, 3), "logprobs": None, "finish_reason": "length"}]


async def test_text_completion_accepts_token_ids_and_streams_text_chunks(client, twin):
    response = await client.post("/v1/completions", headers=AUTH, json={
        "model": "tiny", "prompt": [0, 17, 99], "max_tokens": 4, "stream": True})
    events = await read_sse(response)
    assert twin.handles["tiny"].requests[0][0] == [0, 17, 99]
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == script_text(twin, 4)
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_a_pipeline_failure_answers_502_in_openai_shape(client, twin):
    twin.handles["tiny"].fail_after = 2
    response = await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES})
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["code"] == "pipeline_error" and error["type"] == "server_error"
    assert "stage 1 on node-b stopped answering" in error["message"]


async def test_a_pipeline_failure_mid_stream_sends_an_error_event_and_no_done(client, twin):
    twin.handles["tiny"].fail_after = 3
    response = await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES, "stream": True})
    events = await read_sse(response)
    assert "[DONE]" not in events
    assert set(events[-1]) == {"error"}
    assert events[-1]["error"]["code"] == "pipeline_error" and "node-b" in events[-1]["error"]["message"]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == script_text(twin, 3)


async def test_a_client_that_leaves_mid_stream_cancels_the_generation(client, twin, metrics):
    handle: ScriptedModel = twin.handles["tiny"]
    handle.script = handle.script * 20
    handle.pause_s = 0.02
    response = await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES, "stream": True})
    await response.content.readuntil(b"\n\n")
    await response.content.readuntil(b"\n\n")
    response.close()
    await asyncio.wait_for(handle.cancelled.wait(), timeout=5)
    assert handle.produced < len(handle.script) / 2
    await eventually(lambda: metrics.registry.get_sample_value(
        "exo_inference_requests_total", {"model": "tiny", "status": "499"}) == 1)


async def test_metrics_count_requests_tokens_and_latencies_per_model(client, metrics, twin):
    await client.post(CHAT, headers=AUTH, json={"model": "org/tiny", "messages": MESSAGES, "max_tokens": 5})
    await client.post(CHAT, headers=AUTH, json={"model": "nope", "messages": MESSAGES})
    await client.post(CHAT, headers=AUTH, json={"model": "big", "messages": MESSAGES})
    twin.handles["tiny"].fail_after = 1
    await client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES, "stream": True})
    value = metrics.registry.get_sample_value
    assert value("exo_inference_requests_total", {"model": "tiny", "status": "200"}) == 1
    assert value("exo_inference_requests_total", {"model": "tiny", "status": "502"}) == 1
    assert value("exo_inference_requests_total", {"model": "", "status": "404"}) == 1
    assert value("exo_inference_requests_total", {"model": "big", "status": "503"}) == 1
    assert value("exo_generated_tokens_total", {"model": "tiny"}) == 5 + 1
    assert value("exo_prompt_tokens_total", {"model": "tiny"}) > 0
    assert value("exo_time_to_first_token_seconds_count", {"model": "tiny"}) == 2
    assert value("exo_inter_token_seconds_count", {"model": "tiny"}) == 4
    assert value("exo_inference_in_flight", {"model": "tiny"}) == 0


async def test_a_client_that_leaves_before_a_complete_answer_cancels_the_generation(client, twin, metrics):
    handle: ScriptedModel = twin.handles["tiny"]
    handle.script = handle.script * 20
    handle.pause_s = 0.02
    request = asyncio.create_task(client.post(CHAT, headers=AUTH, json={"model": "tiny", "messages": MESSAGES}))
    while handle.produced < 3:
        await asyncio.sleep(0.01)
    request.cancel()
    await asyncio.wait_for(handle.cancelled.wait(), timeout=5)
    assert handle.produced < len(handle.script) / 2
    await eventually(lambda: metrics.registry.get_sample_value(
        "exo_inference_requests_total", {"model": "tiny", "status": "499"}) == 1)
