"""The single-process MLX backend on the real tiny model: lifecycle, and generation equal to mlx_lm's."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from reconciler.inference import local as local_module
from reconciler.inference.backend import NotReady, SamplingParams
from reconciler.inference.local import LocalBackend

MESSAGES = [{"role": "user", "content": "What is free software?"}]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """mlx_lm's own model and tokenizer, loaded separately."""
    import mlx_lm

    return mlx_lm.load(str(tiny_model_dir))


def mlx_lm_tokens(reference, prompt_ids: list[int], *, max_tokens: int, temperature: float = 0.0,
                  seed: int | None = None) -> list[int]:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = reference
    if seed is not None:
        mx.random.seed(seed)
    return [r.token for r in stream_generate(model, tokenizer, prompt=prompt_ids, max_tokens=max_tokens,
                                             sampler=make_sampler(temp=temperature))]


async def collect(handle, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int) -> list[int]:
    return [token async for token in handle.generate(prompt_ids, params, max_tokens=max_tokens)]


async def test_models_are_pending_then_ready_or_failed_with_the_reason(tiny_model_dir, tmp_path):
    backend = LocalBackend({"tiny": tiny_model_dir, "ghost": tmp_path / "nowhere", "empty": tmp_path})
    try:
        assert [(c.name, c.ready, c.state) for c in backend.models()] == [
            ("tiny", False, "Pending"), ("ghost", False, "Pending"), ("empty", False, "Pending")]
        with pytest.raises(NotReady, match="Pending"):
            backend.resolve("tiny")
        await backend.load()
        states = {c.name: c.state for c in backend.models()}
        assert states["tiny"] == "Ready"
        assert states["ghost"] == f"Failed: {tmp_path / 'nowhere'}: no such directory"
        assert states["empty"] == f"Failed: {tmp_path}: no config.json"
        with pytest.raises(NotReady, match="no such directory"):
            backend.resolve("ghost")
        with pytest.raises(KeyError):
            backend.resolve("llama")
        assert backend.resolve("tiny").tokenizer.eos_token_ids
    finally:
        backend.close()


def test_served_names_must_name_a_model(tiny_model_dir):
    with pytest.raises(ValueError, match="served_names: no model named other"):
        LocalBackend({"tiny": tiny_model_dir}, served_names={"other": "x"})


async def test_greedy_generation_matches_mlx_lm_token_for_token(backend, reference):
    handle = backend.resolve("exo/tiny")
    prompt = handle.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    tokens = await collect(handle, prompt, SamplingParams(temperature=0.0), max_tokens=12)
    assert tokens == mlx_lm_tokens(reference, prompt, max_tokens=12)
    assert len(tokens) == 12


async def test_a_seed_draws_what_mlx_lm_draws_after_mx_random_seed_even_with_requests_in_parallel(backend, reference):
    handle = backend.resolve("tiny")
    prompt = handle.tokenizer.encode("Once upon a time")
    params = [SamplingParams(temperature=1.0, seed=seed) for seed in (7, 8)]
    first, second = await asyncio.gather(*(collect(handle, prompt, p, max_tokens=10) for p in params))
    assert first == mlx_lm_tokens(reference, prompt, max_tokens=10, temperature=1.0, seed=7)
    assert second == mlx_lm_tokens(reference, prompt, max_tokens=10, temperature=1.0, seed=8)
    assert first != second


async def test_closing_a_generation_early_frees_the_model_for_the_next_request(backend):
    handle = backend.resolve("tiny")
    prompt = handle.tokenizer.encode("Hello")
    tokens = handle.generate(prompt, SamplingParams(temperature=0.0), max_tokens=500)
    async with contextlib.aclosing(tokens):
        assert [await anext(tokens), await anext(tokens)]
    after = await asyncio.wait_for(collect(handle, prompt, SamplingParams(temperature=0.0), max_tokens=3), 30)
    assert len(after) == 3


async def test_mlx_work_runs_on_the_compute_thread_not_the_event_loop(backend, monkeypatch):
    threads = []
    original = local_module._start_generation

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(local_module, "_start_generation", recording)
    handle = backend.resolve("tiny")
    await collect(handle, handle.tokenizer.encode("Hi"), SamplingParams(temperature=0.0), max_tokens=2)
    assert threads and threads[0] is not threading.current_thread()
    assert threads[0].name.startswith("mlx-local-backend")
