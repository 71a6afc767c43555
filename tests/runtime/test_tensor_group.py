"""Tensor-parallel groups: which families mlx-lm can shard, the proofs that keep strangers out of a
ring (checked with real rank processes: a rank without the cluster's key tears the group down),
and the frames between a node and its rank process."""
import asyncio
import io

import pytest

from exo_ctl.api.resources import TensorGroup, TensorPeer
from reconciler.runtime import tensor_group as tg
from reconciler.runtime.shard_model import ShardLoadError
from reconciler.runtime.tensor_shard import open_tensor_shard
from tests.model_files import TWO_LAYER_LLAMA

LLAMA = {**TWO_LAYER_LLAMA, "num_key_value_heads": 2}  # 2 query and 2 key/value heads


def test_llama_can_be_sharded_over_two_ranks_but_not_over_three_heads_that_do_not_divide():
    assert tg.tensor_refusal(LLAMA, ranks=2) is None
    refusal = tg.tensor_refusal(LLAMA, ranks=3)
    assert refusal is not None and "num_attention_heads (2)" in refusal and "not divisible by 3" in refusal


def test_a_family_without_shard_is_refused_naming_it():
    config = {**LLAMA, "model_type": "starcoder2", "norm_epsilon": 1e-5}
    refusal = tg.tensor_refusal(config, ranks=2)
    assert refusal is not None and "'starcoder2'" in refusal and "no shard()" in refusal


def test_one_rank_is_never_refused():
    assert tg.tensor_refusal({"model_type": "no-such-family"}, ranks=1) is None


def test_proofs_verify_only_with_the_same_key_and_the_same_nonces():
    key, group, nonces = tg.group_key("token"), b"2|a:1|b:2", bytes(64)
    proofs = b"".join(tg.rank_proof(key, group=group, rank=r, nonces=nonces) for r in range(2))
    assert tg.check_proofs(key, group=group, size=2, nonces=nonces, proofs=proofs) is None
    stranger = tg.rank_proof(tg.group_key("other"), group=group, rank=1, nonces=nonces)
    assert tg.check_proofs(key, group=group, size=2, nonces=nonces, proofs=proofs[:32] + stranger) == 1
    assert tg.check_proofs(key, group=group, size=2, nonces=bytes([1]) + bytes(63), proofs=proofs) == 0


def test_ranks_of_one_group_get_distinct_ports_and_the_key_is_not_the_token():
    assert tg.ring_ports("g", rank=1)[0] == tg.ring_ports("g", rank=0)[0] + 2
    assert tg.group_key("token") != b"token"


def test_a_command_and_its_reply_survive_the_pipe():
    data = bytes(range(24))
    stream = io.BytesIO(tg.encode_command(op=tg.OP_FORWARD, cache_id=7, released=[3, 4], dtype="float32",
                                          shape=(1, 2, 3), data=data))
    assert tg.read_command(stream) == (tg.OP_FORWARD, 7, [3, 4], "float32", (1, 2, 3), data)
    assert tg.read_reply(io.BytesIO(tg.encode_reply(dtype="bfloat16", shape=(1, 4), data=b"12345678"))) == \
        ("bfloat16", (1, 4), b"12345678")
    with pytest.raises(RuntimeError, match="it broke"):
        tg.read_reply(io.BytesIO(tg.encode_failure("it broke")))
    with pytest.raises(EOFError):
        tg.read_command(io.BytesIO(b"\x01\x02"))


async def test_a_rank_without_the_clusters_key_is_refused_and_the_real_rank_still_forms_the_group(tmp_path):
    import mlx.core as mx

    from tests.model_files import write_model

    model = write_model(tmp_path / "llama", LLAMA)
    ports = [tg.ring_ports(f"auth-{tmp_path.name}", rank=r)[0] for r in range(2)]
    peers = [TensorPeer(node=f"n{r}", address=f"127.0.0.1:{ports[r]}") for r in range(2)]
    groups = [TensorGroup(rank=r, size=2, peers=peers) for r in range(2)]
    leader = asyncio.ensure_future(open_tensor_shard(model, start=0, end=2, dtype=None, group=groups[0],
                                                     data_token="cluster"))
    with pytest.raises(ShardLoadError, match="lost rank 0"):  # rank 0 hung up on its wrong proof
        await open_tensor_shard(model, start=0, end=2, dtype=None, group=groups[1], data_token="stranger")
    assert not leader.done()
    follower = await open_tensor_shard(model, start=0, end=2, dtype=None, group=groups[1], data_token="cluster")
    rank0 = await leader
    try:
        logits = rank0.compute.call(lambda: rank0.forward(mx.array([[1, 2, 3]]), cache=rank0.make_cache()))
        assert logits.shape == (1, 1, LLAMA["vocab_size"])
    finally:
        rank0.close()
        follower.close()
