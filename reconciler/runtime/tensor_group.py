"""Tensor-parallel groups: which families mlx-lm can shard, where a group's ranks listen, how
the ranks prove to each other that they belong to this cluster, and the frames between a node
and its rank process.

What the proof protects, honestly: MLX's ring backend opens plain, unauthenticated TCP sockets.
Before any prompt data flows, every rank contributes a fresh random nonce and then an HMAC (with
a key derived from the cluster's data-path token) over all the nonces, its rank and the group;
a group whose all-reduced proofs do not all verify is torn down. So a process that does not
hold the key cannot join a group, nor be joined by a real rank, and a replayed handshake fails.
It does NOT encrypt or authenticate the tensors and commands that flow afterwards (over the ring,
and from rank 0 to the others over their watch connections, which open with a proof of their
own): an attacker who can inject into or read an established TCP stream (on-path) sees hidden
states and can alter them.
Nor does it stop denial of service: MLX's ring accepts the first connection on a rank's port, so
a stranger who connects first makes the proof fail and the group end (Failed, never joined).
Bind the ring to a private network; the sockets bind only to the addresses in the Shard specs.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

from exo_ctl.api.resources import TensorGroup

# Each group takes 2 ports per rank (ring, watch) in a slot of this range, chosen by a hash.
PORT_BASE = 20000
PORT_SLOTS = 400
PORTS_PER_SLOT = 32
PROOF_BYTES = 32
NONCE_BYTES = 32
OP_FORWARD = 1
OP_SHUTDOWN = 2
DTYPES = ("int32", "bfloat16", "float16", "float32")
TENSOR_FIELD = "spec.parallelism.tensor"


def tensor_refusal(config: dict[str, Any], *, ranks: int) -> str | None:
    """Why mlx-lm cannot shard this model over ``ranks`` tensor-parallel ranks, or None if it can.
    Decided by the family's own ``Model.shard`` and its head counts."""
    if ranks <= 1:
        return None
    from mlx_lm.utils import _get_classes

    family = config.get("model_type")
    try:
        model_class, _ = _get_classes(config)
    except (KeyError, ValueError) as error:
        return f"model_type {family!r}: unknown to mlx-lm: {error}"
    if not callable(getattr(model_class, "shard", None)):
        return (f"spec.parallelism.tensor: model_type {family!r} has no tensor-parallel sharding in mlx-lm "
                f"({model_class.__module__}.Model has no shard()); deploy it with tensor: 1")
    text = config.get("text_config") or config
    for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = text.get(field)
        if isinstance(value, int) and value % ranks:
            return f"spec.parallelism.tensor: {field} ({value}) of model_type {family!r} is not divisible by {ranks}"
    return None


def ring_ports(group_name: str, *, rank: int) -> tuple[int, int]:
    """(ring port, watch port) of ``rank`` in the group called ``group_name``."""
    slot = int.from_bytes(hashlib.sha256(group_name.encode()).digest()[:4], "big") % PORT_SLOTS
    ring = PORT_BASE + slot * PORTS_PER_SLOT + 2 * rank
    return ring, ring + 1


def group_key(data_token: str) -> bytes:
    """The key of tensor-group proofs, derived from (never equal to) the data-path token."""
    return hmac.new(data_token.encode(), b"exo-tensor-group-v1", hashlib.sha256).digest()


def group_id(group: TensorGroup) -> bytes:
    """What every rank of one group agrees on: its size and its ranks' addresses, in order."""
    return f"{group.size}|".encode() + "|".join(p.address for p in group.peers).encode()


def rank_proof(key: bytes, *, group: bytes, rank: int, nonces: bytes) -> bytes:
    return hmac.new(key, b"ring|" + group + b"|" + str(rank).encode() + b"|" + nonces, hashlib.sha256).digest()


def watch_proof(key: bytes, *, group: bytes, rank: int) -> bytes:
    return hmac.new(key, b"watch|" + group + b"|" + str(rank).encode(), hashlib.sha256).digest()


def check_proofs(key: bytes, *, group: bytes, size: int, nonces: bytes, proofs: bytes) -> int | None:
    """The first rank whose proof in the all-reduced ``proofs`` is wrong, or None when all verify."""
    for rank in range(size):
        expected = rank_proof(key, group=group, rank=rank, nonces=nonces)
        if not hmac.compare_digest(expected, proofs[rank * PROOF_BYTES:(rank + 1) * PROOF_BYTES]):
            return rank
    return None


# --- command frames: node → rank 0 (its pipes), rank 0 → the other ranks (their watch connections) ---

_COMMAND = struct.Struct("<BIIB")  # op, cache id, released count, ndim
_REPLY = struct.Struct("<BB")      # ok, ndim


def encode_command(*, op: int, cache_id: int, released: list[int], dtype: str = "int32",
                   shape: tuple[int, ...] = (), data: bytes | memoryview = b"") -> bytes:
    head = _COMMAND.pack(op, cache_id, len(released), len(shape))
    body = struct.pack(f"<{len(released)}I{len(shape)}IBQ", *released, *shape, DTYPES.index(dtype), len(data))
    return head + body + bytes(data)


def read_command(stream: Any) -> tuple[int, int, list[int], str, tuple[int, ...], bytes]:
    """(op, cache id, released ids, dtype, shape, data) from a binary stream; EOFError at its end."""
    op, cache_id, count, ndim = _COMMAND.unpack(_read(stream, _COMMAND.size))
    fields = struct.unpack(f"<{count}I{ndim}IBQ", _read(stream, 4 * (count + ndim) + 9))
    released, shape, dtype, length = list(fields[:count]), tuple(fields[count:count + ndim]), fields[-2], fields[-1]
    return op, cache_id, released, DTYPES[dtype], shape, _read(stream, length)


def encode_reply(*, dtype: str, shape: tuple[int, ...], data: bytes | memoryview) -> bytes:
    return _REPLY.pack(1, len(shape)) + struct.pack(f"<{len(shape)}IBQ", *shape, DTYPES.index(dtype), len(data)) \
        + bytes(data)


def encode_failure(message: str) -> bytes:
    data = message.encode()
    return _REPLY.pack(0, 0) + struct.pack("<BQ", 0, len(data)) + data


def read_reply(stream: Any) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype, shape, data) of a result; RuntimeError with the rank's message when it failed."""
    ok, ndim = _REPLY.unpack(_read(stream, _REPLY.size))
    fields = struct.unpack(f"<{ndim}IBQ", _read(stream, 4 * ndim + 9))
    data = _read(stream, fields[-1])
    if not ok:
        raise RuntimeError(data.decode(errors="replace"))
    return DTYPES[fields[-2]], tuple(fields[:ndim]), data


def _read(stream: Any, size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = stream.read(size - len(out))
        if not chunk:
            raise EOFError("the tensor-parallel rank closed its pipe")
        out += chunk
    return out


def tensor_refusal_of(source: str, *, revision: str | None, ranks: int) -> str | None:
    """``tensor_refusal`` for the model at ``source`` when its config is known here (a local path,
    the local Hugging Face cache, or the catalog); None otherwise. Blocking: imports mlx-lm."""
    from reconciler.models.catalog import CATALOG, local_model_dir
    from reconciler.models.metadata import read_config

    if ranks <= 1:
        return None
    directory = local_model_dir(source, revision=revision)
    if directory is not None:
        return tensor_refusal(read_config(directory), ranks=ranks)
    repo = source.removeprefix("hf://").lower()
    known = next((config for name, (config, _) in CATALOG.items() if name.lower() == repo), None)
    return None if known is None else tensor_refusal(known, ranks=ranks)
