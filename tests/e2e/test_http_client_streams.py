"""exo_ctl.http and exo_ctl.sse against a real node serving the tiny model: a streamed completion
reads back as the same text as the unstreamed one, and the node's OpenAI errors decode to HttpError."""
from __future__ import annotations

import pytest

from exo_ctl import sse
from exo_ctl.http import HttpError, HttpClient

pytestmark = pytest.mark.slow


def test_a_streamed_completion_reads_back_the_unstreamed_text_and_errors_name_the_field(tiny_node):
    node = tiny_node
    client = HttpClient(node.api_url, token=node.secret, timeout=60, keep_alive=True)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 12, "temperature": 0}

    whole = client.request_json("POST", "/v1/completions", body=body)[0]["choices"][0]["text"]
    pieces = [p["choices"][0]["text"] for p in sse.data(client.open("POST", "/v1/completions",
                                                                    body={**body, "stream": True}).lines())
              if p.get("choices")]
    assert len(pieces) > 1 and "".join(pieces) == whole

    with pytest.raises(HttpError) as raised:
        client.request_json("POST", "/v1/completions", body={**body, "max_tokens": 0})
    assert raised.value.code == 400 and "max_tokens" in raised.value.message, raised.value
    with pytest.raises(HttpError) as raised:
        HttpClient(node.api_url, token="wrong").request_json("GET", "/v1/models")
    assert raised.value.code == 401
    client.close()
