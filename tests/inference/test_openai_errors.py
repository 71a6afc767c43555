"""Every refusal of the OpenAI API is an OpenAI-shaped error with the right status, never a 500."""
from __future__ import annotations

import jinja2
import pytest

from tests.inference.inference_helpers import AUTH, TOKEN

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
ERROR_KEYS = {"message", "type", "param", "code"}


async def openai_error(response, status: int) -> dict:
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    return body["error"]


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": MESSAGES, **fields}


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"messages": MESSAGES}, "model", "required"),
    (chat(model=7), "model", "non-empty string"),
    ({"model": "tiny"}, "messages", "required"),
    (chat(messages=[]), "messages", "non-empty list"),
    (chat(messages="hello"), "messages", "non-empty list"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", "one of"),
    (chat(messages=[{"role": "user"}]), "messages[0].content", "string"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0].type", '"text"'),
    (chat(temperature=3), "temperature", "from 0 to 2"),
    (chat(temperature="hot"), "temperature", "number"),
    (chat(top_p=1.5), "top_p", "from 0 to 1"),
    (chat(max_tokens=0), "max_tokens", ">= 1"),
    (chat(max_tokens="ten"), "max_tokens", "integer"),
    (chat(max_completion_tokens=True), "max_completion_tokens", "integer"),
    (chat(n=9), "n", "from 1 to 8"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (chat(stop=3), "stop", "string or a list"),
    (chat(stop=[""]), "stop", "not be empty"),
    (chat(stream="yes"), "stream", "true or false"),
    (chat(stream_options={"include_usage": True}), "stream_options", "stream is true"),
    (chat(stream=True, stream_options={"include_usage": "y"}), "stream_options.include_usage", "true or false"),
    (chat(seed="x"), "seed", "integer"),
    (chat(logprobs="yes"), "logprobs", "true or false"),
    (chat(top_logprobs=2), "top_logprobs", "logprobs is true"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs", "from 0 to 20"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "no tool-call format"),
    (chat(response_format={"type": "yaml"}), "response_format.type", "json_schema"),
    (chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object", "required": 3}}}),
     "response_format.json_schema.schema", "cannot be decoded"),
])
async def test_a_bad_chat_request_is_a_400_naming_the_field(client, body, param, words):
    error = await openai_error(await client.post(CHAT, headers=AUTH, json=body), 400)
    assert error["param"] == param
    assert error["message"].startswith(param + ":") and words in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": "tiny"}, "prompt", "required"),
    ({"model": "tiny", "prompt": ["one", "two"]}, "prompt", "only one prompt"),
    ({"model": "tiny", "prompt": [1, -2]}, "prompt", "token ids"),
    ({"model": "tiny", "prompt": []}, "prompt", "token ids"),
    ({"model": "tiny", "prompt": [1, 999999]}, "prompt", "vocabulary size"),
    ({"model": "tiny", "prompt": "x", "echo": True}, "echo", "not supported"),
    ({"model": "tiny", "prompt": "x", "best_of": 3}, "best_of", "not supported"),
])
async def test_a_bad_completion_request_is_a_400_naming_the_field(client, body, param, words):
    error = await openai_error(await client.post("/v1/completions", headers=AUTH, json=body), 400)
    assert error["param"] == param and words in error["message"]


@pytest.mark.parametrize(("data", "words"), [(b"{not json", "not valid JSON"), (b"[1, 2]", "a list"),
                                             (b"\xff\xfe", "not valid JSON"), (b"", "not valid JSON")])
async def test_a_body_that_is_not_a_json_object_is_a_400(client, data, words):
    error = await openai_error(await client.post(CHAT, headers={**AUTH, "Content-Type": "application/json"},
                                                 data=data), 400)
    assert words in error["message"] and error["code"] == "invalid_json"


async def test_an_unknown_model_is_404_model_not_found(client):
    for path, body in ((CHAT, chat(model="llama-9000")), ("/v1/completions", {"model": "llama-9000", "prompt": "x"})):
        error = await openai_error(await client.post(path, headers=AUTH, json=body), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model" and "llama-9000" in error["message"]


async def test_a_model_that_is_not_ready_is_503_with_retry_after(client):
    response = await client.post(CHAT, headers=AUTH, json=chat(model="big", stream=True))
    error = await openai_error(response, 503)
    assert response.headers["Retry-After"] == "3"
    assert error["code"] == "model_not_ready" and "Loading 2/3 shards" in error["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}])
async def test_a_request_without_the_cluster_key_is_401_in_openai_shape(client, twin, headers):
    for method, path in (("GET", "/v1/models"), ("POST", CHAT), ("POST", "/v1/completions"), ("GET", "/v1/nothing")):
        response = await client.request(method, path, headers=headers, json=chat())
        error = await openai_error(response, 401)
        assert error["code"] == "invalid_api_key" and "tiny" not in await response.text()
    assert twin.handles["tiny"].requests == []


async def test_unknown_paths_and_wrong_methods_under_v1_answer_in_openai_shape(client):
    await openai_error(await client.get("/v1/images/generations", headers=AUTH), 404)
    response = await client.get(CHAT, headers=AUTH)
    await openai_error(response, 405)
    assert "POST" in response.headers["Allow"]


async def test_a_request_body_over_the_size_limit_is_413(client):
    huge = chat(messages=[{"role": "user", "content": "x" * (2 * 1024 * 1024)}])
    error = await openai_error(await client.post(CHAT, headers=AUTH, json=huge), 413)
    assert error["code"] == "request_too_large"


class StrictTemplate:
    """A tokenizer whose chat template refuses every conversation, as strict templates do."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def apply_chat_template(self, *args, **kwargs):
        raise jinja2.TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")


async def test_messages_the_chat_template_rejects_are_a_400(client, twin):
    twin.handles["tiny"].tokenizer = StrictTemplate(twin.handles["tiny"].tokenizer)
    error = await openai_error(await client.post(CHAT, headers=AUTH, json=chat()), 400)
    assert error["param"] == "messages" and "roles must alternate" in error["message"]
