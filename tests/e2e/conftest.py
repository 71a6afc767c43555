"""Clusters that several e2e modules share (package scope: started by the first test that asks,
killed after the last test of tests/e2e). Only tests that read, apply deployments or send
requests use them; a test that kills, restarts, partitions or drains nodes starts its own."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.cluster import ExoProcess
from harness.serving import Reference, Served, serving_cluster


@pytest.fixture(scope="package")
def tiny_model() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return Path(build_model("tiny"))


@pytest.fixture(scope="package")
def tiny_reference(tiny_model: Path) -> Reference:
    """Single-process mlx-lm on the tiny model, what the cluster's answers are compared with."""
    return Reference(tiny_model)


@pytest.fixture(scope="package")
def tools_model() -> Path:
    from exo_ctl.model_builder.tools_model import build_tools_model

    return Path(build_tools_model())


@pytest.fixture(scope="package")
def tiny_node(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ExoProcess]:
    """One node serving the tiny model as ``tiny`` (one stage): the anthropic, ollama and
    exo_ctl.http client tests."""
    with serving_cluster(tmp_path_factory.mktemp("tiny-node"), nodes=1,
                         serve={"tiny": Served(tiny_model, stages=1, strategy="Pack")}) as cluster:
        yield cluster.nodes[0]


@pytest.fixture(scope="package")
def tools_node(tmp_path_factory: pytest.TempPathFactory, tools_model: Path) -> Iterator[ExoProcess]:
    """Two nodes serving the tiny model with a tool template as ``tools`` over two stages; node0,
    which the clients talk to: the openai, langchain, anthropic and ollama tool-call tests."""
    with serving_cluster(tmp_path_factory.mktemp("tools-nodes"), nodes=2,
                         serve={"tools": Served(tools_model, stages=2)}) as cluster:
        yield cluster.nodes[0]
