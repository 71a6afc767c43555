"""The official ``ollama`` client against a real ``exo`` node: tags, show, chat and generate,
streamed and not, JSON format, and refusals in Ollama's shape."""
from __future__ import annotations

import json

import httpx
import ollama
import pytest


pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Say something."}]
OPTIONS = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def node(tiny_node):
    return tiny_node


@pytest.fixture(scope="module")
def client(node) -> ollama.Client:
    return ollama.Client(host=node.api_url, headers={"Authorization": f"Bearer {node.secret}"}, trust_env=False)


def test_tags_and_show_describe_the_served_model(client):
    assert [m.model for m in client.list().models] == ["tiny"]
    shown = client.show("tiny")
    assert shown.modelinfo["context_length"] > 0 and "{%" in shown.template


def test_chat_streamed_and_not_writes_the_same_text(client):
    whole = client.chat(model="tiny", messages=MESSAGES, options=OPTIONS)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 12
    parts = list(client.chat(model="tiny", messages=MESSAGES, options=OPTIONS, stream=True))
    assert parts[-1].done and "".join(p.message.content for p in parts) == whole.message.content


def test_generate_through_the_template_or_raw(client):
    templated = client.generate(model="tiny", prompt="Say something.", options=OPTIONS)
    chat = client.chat(model="tiny", messages=MESSAGES, options=OPTIONS)
    assert templated.response == chat.message.content
    raw = list(client.generate(model="tiny", prompt="Once upon a time", raw=True, options=OPTIONS, stream=True))
    assert raw[-1].done and raw[-1].eval_count == 12 and "".join(p.response for p in raw)


def test_a_json_format_answer_parses(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    answer = client.chat(model="tiny", messages=MESSAGES, format=schema, options={"num_predict": 20})
    assert isinstance(json.loads(answer.message.content)["ok"], bool)


def test_unsupported_options_and_unknown_models_are_refused_in_ollamas_shape(client, node):
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="tiny", messages=MESSAGES, options={"mirostat": 2})
    assert refused.value.status_code == 400 and "options.mirostat" in refused.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama3", messages=MESSAGES)
    assert missing.value.status_code == 404
    anonymous = httpx.post(f"{node.api_url}/api/chat", json={"model": "tiny", "messages": MESSAGES}, trust_env=False)
    assert anonymous.status_code == 401
