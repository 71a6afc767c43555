"""Two real tensor-parallel rank processes (ring over TCP on 127.0.0.1) serve what one process
would: greedy tokens equal mlx-lm's with a tied and an untied head (each rank computes a slice of
the vocabulary), requests with their own caches interleave and a freed one is dropped, and a later
pipeline stage split over the ranks turns hidden states into the same logits as one process."""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from exo_ctl.api.resources import TensorGroup, TensorPeer
from reconciler.runtime import tensor_group as tg
from reconciler.runtime.tensor_shard import TensorShard, open_tensor_shard
from tests.model_files import TWO_LAYER_LLAMA, write_model

LLAMA = {**TWO_LAYER_LLAMA, "num_key_value_heads": 2}  # 2 query and 2 key/value heads: 2 ranks
PROMPT = [5, 17, 300, 42, 99, 7]


async def open_group(model: Path, name: str, *, start: int, end: int) -> tuple[TensorShard, TensorShard]:
    ports = [tg.ring_ports(name, rank=r)[0] for r in range(2)]
    peers = [TensorPeer(node=f"n{r}", address=f"127.0.0.1:{ports[r]}") for r in range(2)]
    groups = [TensorGroup(rank=r, size=2, peers=peers) for r in range(2)]
    leader = asyncio.ensure_future(open_tensor_shard(model, start=start, end=end, dtype="float32", group=groups[0],
                                                     data_token="cluster"))
    follower = await open_tensor_shard(model, start=start, end=end, dtype="float32", group=groups[1],
                                       data_token="cluster")
    return await leader, follower


def mlx_lm_greedy(model: Path, count: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load_model

    reference, _ = load_model(model)
    return [int(t) for t, _ in generate_step(mx.array(PROMPT), reference, max_tokens=count,
                                             sampler=make_sampler(temp=0.0))]


@pytest.mark.parametrize("tied", [True, False])
async def test_two_ranks_decode_greedy_tokens_like_mlx_lm_while_requests_interleave(tmp_path, tied):
    import mlx.core as mx

    model = write_model(tmp_path / "llama", {**LLAMA, "tie_word_embeddings": tied}, dtype="float32")
    expected = mlx_lm_greedy(model, 10)
    rank0, rank1 = await open_group(model, f"greedy-{tied}-{tmp_path.name}", start=0, end=2)

    def decode() -> tuple[list[int], list[int]]:
        first, second = rank0.make_cache(), rank0.make_cache()
        logits = rank0.forward(mx.array([PROMPT]), cache=first)
        assert logits.shape == (1, 1, LLAMA["vocab_size"])  # the whole vocabulary, last position only
        ours = [int(mx.argmax(logits[0, -1]).item())]
        other = [int(mx.argmax(rank0.forward(mx.array([PROMPT[:3]]), cache=second)[0, -1]).item())]
        for _ in range(9):  # two requests' steps alternate, each on its own cache
            ours.append(int(mx.argmax(rank0.forward(mx.array([[ours[-1]]]), cache=first)[0, -1]).item()))
            if second is not None and len(ours) == 4:
                second = None  # freed: the ranks drop its caches at the next command
            elif second is not None:
                other.append(int(mx.argmax(rank0.forward(mx.array([[other[-1]]]), cache=second)[0, -1]).item()))
        return ours, other

    try:
        ours, other = rank0.compute.call(decode)
    finally:
        rank0.close()
        rank1.close()
    assert ours == expected
    assert len(other) == 3


async def test_a_later_stage_over_two_ranks_turns_hidden_states_into_the_logits_of_one_process(tmp_path):
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model

    from reconciler.runtime.shard_model import _inner
    from reconciler.runtime.stage_split import find_layout, split_model

    model = write_model(tmp_path / "llama", LLAMA, dtype="float32")
    whole, _ = load_model(model)
    expected = whole(mx.array([PROMPT]))[:, -1:, :]
    first, _ = load_model(model)  # the first pipeline stage, [0, 1), in this process
    layout = find_layout(first, num_layers=2)
    split_model(first, layout, start=0, end=1, num_layers=2)
    hidden = _inner(first, layout)(mx.array([PROMPT]), cache=first.make_cache())
    mx.eval(hidden, expected)  # here: the rank's handle runs on its own compute thread
    rank0, rank1 = await open_group(model, f"later-{tmp_path.name}", start=1, end=2)
    try:
        logits = rank0.compute.call(lambda: np.array(rank0.forward(hidden, cache=rank0.make_cache())))
    finally:
        rank0.close()
        rank1.close()
    assert logits.shape == expected.shape
    assert np.allclose(logits, np.array(expected), atol=1e-4)


async def test_two_ranks_quantize_before_they_split_so_each_holds_half_of_the_quantized_layers(tmp_path):
    """spec.model.dtype 8bit on float files: the ranks quantize the layers, then split them with
    mlx-lm's own shard (which splits quantized layers too); greedy tokens equal mlx-lm's on the
    model quantized the same way, and each rank holds about half of the quantized bytes."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load_model

    from reconciler.runtime.shard_model import parameter_bytes
    from reconciler.runtime.weight_dtype import apply_dtype

    # Dimensions that quantization groups of 64 divide, also after a split in two.
    config = {**LLAMA, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2,
              "num_key_value_heads": 2}
    model = write_model(tmp_path / "llama", config, dtype="float32")
    reference, reference_config = load_model(model)
    apply_dtype(reference, reference_config, dtype="8bit", model_path=model)
    whole = parameter_bytes(reference)
    expected = [int(t) for t, _ in generate_step(mx.array(PROMPT), reference, max_tokens=8,
                                                 sampler=make_sampler(temp=0.0))]

    ring_folders = set(Path(tempfile.gettempdir()).glob("exo-ring-*"))  # each rank's MLX hostfile
    ports = [tg.ring_ports(f"q8-{tmp_path.name}", rank=r)[0] for r in range(2)]
    peers = [TensorPeer(node=f"n{r}", address=f"127.0.0.1:{ports[r]}") for r in range(2)]
    groups = [TensorGroup(rank=r, size=2, peers=peers) for r in range(2)]
    leader = asyncio.ensure_future(open_tensor_shard(model, start=0, end=2, dtype="8bit", group=groups[0],
                                                     data_token="cluster"))
    rank1 = await open_tensor_shard(model, start=0, end=2, dtype="8bit", group=groups[1], data_token="cluster")
    rank0 = await leader
    assert set(Path(tempfile.gettempdir()).glob("exo-ring-*")) == ring_folders, "a rank left its hostfile behind"

    def decode() -> list[int]:
        cache = rank0.make_cache()
        tokens = [int(mx.argmax(rank0.forward(mx.array([PROMPT]), cache=cache)[0, -1]).item())]
        for _ in range(7):
            tokens.append(int(mx.argmax(rank0.forward(mx.array([[tokens[-1]]]), cache=cache)[0, -1]).item()))
        return tokens

    try:
        got = rank0.compute.call(decode)
    finally:
        rank0.close()
        rank1.close()
    assert got == expected
    # Half the quantized layers and head, plus the whole embedding: well under the quantized whole.
    assert rank0.nbytes < 0.75 * whole, (rank0.nbytes, whole)
