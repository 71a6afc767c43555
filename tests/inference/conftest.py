"""The tiny local model, its tokenizer, a twin backend and a client of the API over it."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from reconciler.inference.backend import ModelCard
from reconciler.inference.local import LocalBackend
from reconciler.metrics import NodeMetrics

from tests.inference.backend_twin import ScriptedModel, TwinBackend
from tests.inference.inference_helpers import serve


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from exo_ctl.model_builder.build_model import build_model

    return build_model("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def backend(tiny_model_dir: Path):
    """The real single-process MLX backend on the tiny model, loaded once."""
    backend = LocalBackend({"tiny": tiny_model_dir}, served_names={"tiny": "exo/tiny"})
    asyncio.run(backend.load())
    yield backend
    backend.close()


@pytest.fixture
def twin(tokenizer) -> TwinBackend:
    """``tiny`` (served as ``org/tiny``) answers with a scripted text; ``big`` is still loading."""
    script = tokenizer.encode("Paris is the capital of France. It is on the Seine.", add_special_tokens=False)
    return TwinBackend(
        cards=[ModelCard(name="tiny", ready=True, state="Ready", created=1700000000, source="hf://org/tiny",
                         served_name="org/tiny"),
               ModelCard(name="big", ready=False, state="Loading 2/3 shards", created=1700000001,
                         source="hf://org/big")],
        handles={"tiny": ScriptedModel(tokenizer, script)},
    )


@pytest.fixture
def metrics() -> NodeMetrics:
    return NodeMetrics(node="node-a")


@pytest.fixture
async def client(twin: TwinBackend, metrics: NodeMetrics,
                 caplog: pytest.LogCaptureFixture) -> AsyncIterator[TestClient]:
    """A client of the twin-backed API; at the end, asserts that no request reached the 500 catch-all."""
    async with await serve(twin, metrics=metrics) as test_client:
        yield test_client
    errors = [r for r in caplog.records if r.name.startswith(("reconciler", "aiohttp")) and r.levelno >= logging.ERROR]
    assert not errors, f"unexpected server errors: {[r.getMessage() for r in errors]}"
