"""``/v1/embeddings`` through the official ``openai`` client against two real ``exo`` nodes serving
the tiny model over two stages: each vector is single-process mlx-lm's mean of the normed last
hidden states, several inputs come back in order, and deployments without the field refuse."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openai
import pytest

from harness.cluster import start_cluster
from harness.serving import APPLY, DEPLOYMENTS, apply, client_for, manifest, wait_nodes_ready, wait_serving

pytestmark = pytest.mark.slow

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return Path(build_model("tiny"))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    cluster = start_cluster(2, tmp_path_factory.mktemp("clients-embeddings"))
    try:
        wait_nodes_ready(cluster, 2)
        node = cluster.nodes[0]
        body = manifest("embed", model_dir, strategy="Spread") + "  serving:\n    embeddings: true\n"
        status, _, answer = node.request("PATCH", f"{DEPLOYMENTS}/embed", body=body, content_type=APPLY)
        assert status in (200, 201), answer
        apply(node, "plain", model_dir, strategy="Pack")
        wait_serving(node, "embed", stages=2)
        wait_serving(node, "plain", stages=1)
        yield client_for(node)
    finally:
        cluster.close()
        print(cluster.logs())


def reference(model_dir: Path, text: str) -> np.ndarray:
    """mlx-lm in this process: the inner model (its layers, then its final norm), mean over positions."""
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))
    hidden = model.model(mx.array([tokenizer.encode(text)]))
    return np.array(hidden.astype(mx.float32).mean(axis=1)[0])


def test_each_vector_is_the_mean_pooled_normed_last_hidden_state_in_order(client, model_dir):
    from mlx_lm import load

    answer = client.embeddings.create(model="embed", input=TEXTS)  # the client asks for base64
    assert [d.index for d in answer.data] == [0, 1]
    for data, text in zip(answer.data, TEXTS):
        expected = reference(model_dir, text)
        assert len(data.embedding) == expected.shape[0]
        np.testing.assert_allclose(np.array(data.embedding), expected, rtol=0.05, atol=0.05)
    assert not np.allclose(answer.data[0].embedding, answer.data[1].embedding, atol=0.05)
    tokenizer = load(str(model_dir))[1]
    assert answer.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS)
    floats = client.embeddings.create(model="embed", input=TEXTS[1], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, answer.data[1].embedding, rtol=1e-6)
    ids = client.embeddings.create(model="embed", input=[tokenizer.encode(TEXTS[1])])
    np.testing.assert_allclose(ids.data[0].embedding, answer.data[1].embedding, rtol=1e-6)


def test_dimensions_other_than_the_hidden_size_and_deployments_without_the_field_are_refused(client):
    size = len(client.embeddings.create(model="embed", input="Hello", encoding_format="float").data[0].embedding)
    assert client.embeddings.create(model="embed", input="Hello", dimensions=size).data[0].embedding
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="embed", input="Hello", dimensions=size - 1)
    with pytest.raises(openai.BadRequestError, match="spec.serving.embeddings"):
        client.embeddings.create(model="plain", input="Hello")
    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model="embed", input="")
