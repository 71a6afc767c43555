"""The official ``anthropic`` client against a real ``exo`` node: messages, streamed and not,
stop reasons, and tools refused with an Anthropic-shaped 400."""
from __future__ import annotations

import anthropic
import pytest

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(tiny_node):
    # api_key: the SDK's default x-api-key header, as Anthropic's own API takes it
    return anthropic.Anthropic(base_url=tiny_node.api_url, api_key=tiny_node.secret, max_retries=0,
                               http_client=anthropic.DefaultHttpxClient(trust_env=False, timeout=60))


def test_a_message_and_its_stream_carry_the_same_text(client):
    fields = {"model": "tiny", "max_tokens": 10, "messages": MESSAGES, "system": "Be brief.",
              "extra_body": {"temperature": 0}}
    message = client.messages.create(**fields)
    assert message.role == "assistant" and message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 10 and message.usage.input_tokens > 0
    with client.messages.stream(**fields) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == message.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens"


def test_tools_are_refused_with_an_anthropic_error(client):
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="tiny", max_tokens=5, messages=MESSAGES,
                               tools=[{"name": "f", "input_schema": {"type": "object"}}])
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "tools" in refused.value.body["error"]["message"]
