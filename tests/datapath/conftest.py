"""A tiny random Llama model written to disk, shared by the data-path tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 6,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def write_random_llama(directory: Path, *, seed: int, tie_word_embeddings: bool) -> Path:
    """Write config.json + model.safetensors (bf16) of a seeded random mlx-lm Llama."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    config = {**TINY_CONFIG, "tie_word_embeddings": tie_word_embeddings}
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Gaussian matrices (std 1/sqrt(fan_in), unit embeddings) give varied greedy outputs;
    # mlx's default init makes a random model repeat one token forever.
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if value.ndim == 2:
            std = 1.0 if "embed_tokens" in name else value.shape[-1] ** -0.5
            value = mx.random.normal(value.shape) * std
        weights[name] = value.astype(mx.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_tied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("tiny-llama-tied"), seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def reference_tokens():
    """Token ids from single-process mlx_lm (`generate_step`) for a model, prompt and sampler."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load_model

    models = {}

    def run(model_path: Path, prompt: list[int], *, max_tokens: int, prefill_step_size: int = 512,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[int]:  # fmt: skip
        if model_path not in models:
            models[model_path] = load_model(model_path)[0]
        mx.random.seed(seed)
        steps = generate_step(
            mx.array(prompt), models[model_path], max_tokens=max_tokens,
            sampler=make_sampler(temperature, top_p), prefill_step_size=prefill_step_size,
        )  # fmt: skip
        return [token for token, _ in steps]

    return run


class RunningStages:
    """StageServers on 127.0.0.1, one per layer range, each serving its own loaded shard."""

    def __init__(self, model_path: Path, ranges: list[tuple[int, int]], *, token: str | None = None) -> None:
        self.model_path = model_path
        self.ranges = ranges
        self.token = token
        self.servers = []
        self.shards = []

    async def __aenter__(self) -> "RunningStages":
        from reconciler.datapath import StageServer
        from reconciler.runtime import open_shard

        for index, (start, end) in enumerate(self.ranges):
            shard = await open_shard(self.model_path, start=start, end=end)
            server = StageServer(host="127.0.0.1", port=0, token=self.token)
            server.add_shard(f"stage{index}", shard)
            await server.start()
            self.shards.append(shard)
            self.servers.append(server)
        return self

    @property
    def route(self):
        return [server.address(f"stage{i}") for i, server in enumerate(self.servers)]

    def active_requests(self) -> list[int]:
        return [server.active_requests() for server in self.servers]

    async def __aexit__(self, *exc: object) -> None:
        for server in self.servers:
            await server.stop()
        for shard in self.shards:
            shard.close()


@pytest.fixture
def stages():
    return RunningStages
