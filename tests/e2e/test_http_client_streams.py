"""exo_ctl.http and exo_ctl.sse against a real node serving the tiny model: a streamed completion
reads back as the same text as the unstreamed one, and the node's OpenAI errors decode to HttpError."""
from __future__ import annotations

from pathlib import Path

import pytest

from exo_ctl import sse
from exo_ctl.http import HttpError, HttpClient
from harness.serving import apply, wait_nodes_ready, wait_serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return build_model("tiny")


def test_a_streamed_completion_reads_back_the_unstreamed_text_and_errors_name_the_field(exo_cluster, model_dir):
    cluster = exo_cluster(1)
    node = cluster.nodes[0]
    wait_nodes_ready(cluster, 1)
    apply(node, "tiny", model_dir)
    wait_serving(node, "tiny", stages=1, timeout=60)
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
