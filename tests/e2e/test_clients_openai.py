"""The official ``openai`` client against two real ``exo`` nodes serving the tiny model over two
stages: penalties and bias applied at the last stage (the same tokens as mlx-lm with the same
processors), logprobs, and n choices, streamed and not."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.cluster import start_cluster
from harness.serving import Reference, apply, client_for, wait_nodes_ready, wait_serving

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "List some colours, one per line."}]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return build_model("tiny")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)


@pytest.fixture(scope="module")
def openai_client(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    cluster = start_cluster(2, tmp_path_factory.mktemp("clients-openai"))
    try:
        wait_nodes_ready(cluster, 2)
        apply(cluster.nodes[0], "tiny", model_dir, strategy="Spread")
        wait_serving(cluster.nodes[0], "tiny", stages=2)
        yield client_for(cluster.nodes[0])
    finally:
        cluster.close()
        print(cluster.logs())


def _mlx_lm_text(reference: Reference, **penalties) -> str:
    """Greedy mlx-lm generate_step with mlx-lm's processors, cut at the first end of sequence."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    ids = []
    steps = generate_step(mx.array(reference.chat_ids(MESSAGES)), reference.model, max_tokens=MAX_TOKENS,
                          logits_processors=make_logits_processors(**penalties))
    for token, _ in steps:
        if int(token) in reference.tokenizer.eos_token_ids:
            break
        ids.append(int(token))
    return reference.text(ids)


def _chat(client, **fields):
    return client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                          **fields)


def test_penalties_at_the_last_stage_write_what_mlx_lm_writes_with_them(openai_client, reference):
    plain = _chat(openai_client).choices[0].message.content
    assert plain == _mlx_lm_text(reference)
    penalized = _chat(openai_client, presence_penalty=1.5, frequency_penalty=1.0).choices[0].message.content
    assert penalized != plain
    assert penalized == _mlx_lm_text(reference, presence_penalty=1.5, frequency_penalty=1.0)
    repeated = _chat(openai_client, extra_body={"repetition_penalty": 2.0}).choices[0].message.content
    assert repeated == _mlx_lm_text(reference, repetition_penalty=2.0)


def test_logit_bias_bans_the_first_token_it_would_write(openai_client, reference):
    first = reference.tokenizer.encode(_chat(openai_client).choices[0].message.content, add_special_tokens=False)[0]
    answer = _chat(openai_client, logit_bias={str(first): -100}, logprobs=True).choices[0]
    assert answer.logprobs.content[0].token != reference.tokenizer.decode([first])


def test_logprobs_come_back_with_each_token_streamed_or_not(openai_client):
    whole = _chat(openai_client, logprobs=True, top_logprobs=2).choices[0]
    entries = whole.logprobs.content
    assert "".join(e.token for e in entries) == whole.message.content
    assert all(e.logprob <= 0 and e.top_logprobs[0].logprob == e.logprob for e in entries)
    stream = _chat(openai_client, logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_two_choices_are_generated_through_the_pipeline_and_stream_alike(openai_client):
    fields = {"n": 2, "temperature": 1.2, "seed": 5}
    whole = openai_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, **fields)
    texts = [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert len(texts) == 2 and texts[0] != texts[1]
    stream = openai_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                   stream=True, **fields)
    streamed = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_a_json_schema_answer_from_the_pipeline_always_validates(openai_client):
    import json

    import jsonschema

    schema = {"type": "object", "additionalProperties": False, "required": ["city", "rank"],
              "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "rank": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 9}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    for seed in (1, 2, 3):
        answer = openai_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, seed=seed,
                                                       temperature=1.0, response_format=response_format).choices[0]
        assert answer.finish_reason == "stop"
        jsonschema.validate(json.loads(answer.message.content), schema)


def test_litellm_through_the_openai_route_gets_the_same_answer(openai_client):
    import os

    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before the import: never fetch the cost map
    import litellm

    expected = _chat(openai_client, presence_penalty=1.0).choices[0].message.content
    answer = litellm.completion(model="openai/tiny", api_base=str(openai_client.base_url), messages=MESSAGES,
                                api_key=openai_client.api_key, max_tokens=MAX_TOKENS, temperature=0,
                                presence_penalty=1.0)
    assert answer.choices[0].message.content == expected


def test_langchain_structured_output_and_tools_refused_for_a_model_without_a_tool_template(openai_client):
    import openai
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Pick(BaseModel):
        colour: str = Field(json_schema_extra={"enum": ["red", "blue"]})
        score: int = Field(ge=0, le=9)

    chat = ChatOpenAI(model="tiny", base_url=str(openai_client.base_url), api_key=openai_client.api_key,
                      max_retries=0, temperature=0.8, max_tokens=30, http_client=openai_client._client)
    picked = chat.with_structured_output(Pick, method="json_schema", strict=True).invoke("Pick a colour.")
    assert picked.colour in ("red", "blue") and 0 <= picked.score <= 9
    # The tiny model's template has no tool format: refused by name (tests/e2e/test_clients_tools.py calls tools).
    with pytest.raises(openai.BadRequestError, match="`tiny` has no tool-call format"):
        chat.bind_tools([Pick]).invoke("Pick a colour.")
