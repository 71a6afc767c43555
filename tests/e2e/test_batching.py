"""Continuous batching through real ``exo`` processes: 8 concurrent different prompts on 1 node and
on 2 stages run in batched forwards (the stage metrics say so), and each one's greedy token ids
equal single-process mlx_lm's for that prompt alone."""
from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.cluster import start_cluster
from harness.serving import DEPLOYMENTS, Reference, client_for, node_named, shards_of, wait_nodes_ready, wait_serving
from reconciler.datapath.pipeline import PipelineClient
from reconciler.inference.cluster import ready_routes
from reconciler.node import data_path_token

pytestmark = pytest.mark.slow

PROMPTS = ["The river runs", "Once upon a time", "Bridges are built", "In the beginning the compiler",
           "Bees make honey because", "A glacier moves", "The printing press", "Trains at night"]
MAX_TOKENS = 10
STAGES = {"single": 1, "pair": 2}


def manifest(name: str, source: Path, *, strategy: str) -> str:
    return (f"apiVersion: exo.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: {name}\nspec:\n"
            f"  model:\n    source: {source}\n  placement:\n    strategy: {strategy}\n"
            f"  resources:\n    maxConcurrentRequests: 8\n    maxBatchSize: 8\n")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return build_model("tiny")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    cluster = start_cluster(2, tmp_path_factory.mktemp("batching"))
    try:
        wait_nodes_ready(cluster, 2)
        entry = cluster.nodes[0]
        for name, strategy in (("single", "Pack"), ("pair", "Spread")):
            status, _, body = entry.request("PATCH", f"{DEPLOYMENTS}/{name}", body=manifest(name, model_dir,
                                            strategy=strategy), content_type="application/apply-patch+yaml")
            assert status in (200, 201), body
        for name, stages in STAGES.items():
            wait_serving(entry, name, stages=stages)
        yield cluster
    finally:
        cluster.close()
        print(cluster.logs())


def batched_steps(cluster, deployment: str) -> tuple[int, int]:
    """(compute steps, steps with more than one request) of the deployment's stages, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    steps = single = 0.0
    for shard in shards_of(cluster.nodes[0], deployment):
        status, _, text = node_named(cluster, shard["spec"]["nodeName"]).request("GET", "/metrics")
        assert status == 200, text
        for family in text_string_to_metric_families(text):
            for sample in family.samples if family.name == "exo_stage_batch_size" else ():
                if sample.labels.get("shard") != shard["metadata"]["name"]:
                    continue
                if sample.name.endswith("_count"):
                    steps += sample.value
                elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == 1.0:
                    single += sample.value
    return int(steps), int(steps - single)


@pytest.mark.parametrize("deployment", list(STAGES))
def test_eight_concurrent_prompts_are_batched_and_each_decodes_like_single_process_mlx_lm(cluster, reference,
                                                                                           deployment):
    entry = cluster.nodes[0]
    prompts = [reference.tokenizer.encode(p) for p in PROMPTS]
    expected = [reference.greedy(ids, MAX_TOKENS) for ids in prompts]
    assert len({tuple(e) for e in expected}) == len(PROMPTS) and all(len(e) >= 4 for e in expected)
    _, _, deployed = entry.request("GET", f"{DEPLOYMENTS}/{deployment}")
    [route] = ready_routes(deployed, shards_of(entry, deployment))
    eos = set(reference.tokenizer.eos_token_ids)

    async def one(client: PipelineClient, ids: list[int]) -> list[int]:
        tokens = client.generate(route, ids, max_tokens=MAX_TOKENS, stop_ids=eos)
        async with contextlib.aclosing(tokens):
            return [token async for token in tokens]

    async def all_at_once() -> list[list[int]]:
        async with PipelineClient(token=data_path_token(entry.secret)) as client:
            return list(await asyncio.gather(*(one(client, ids) for ids in prompts)))

    before = batched_steps(cluster, deployment)
    assert asyncio.run(all_at_once()) == expected
    steps, batched = (a - b for a, b in zip(batched_steps(cluster, deployment), before))
    assert batched >= 1 and steps < len(PROMPTS) * MAX_TOKENS * STAGES[deployment], (steps, batched)
    # The OpenAI API of the entry node, 8 clients at once: the same texts.
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda p: client_for(entry).completions.create(
            model=deployment, prompt=p, max_tokens=MAX_TOKENS, temperature=0), PROMPTS))
    assert [r.choices[0].text for r in replies] == [reference.text(e) for e in expected]
