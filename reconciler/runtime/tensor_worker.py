"""One rank of a tensor-parallel stage, in its own process (``python -m reconciler.runtime.tensor_worker``).

MLX keeps one ring group per process for its whole life, so every rank runs here, supervised by
its node's shard agent. The process reads a JSON config line on stdin, then: rank 0 dials a
watch connection from every other rank (authenticated), all ranks join the ring and prove their
membership (see ``tensor_group``), load layers [start, end) sharded by mlx-lm's own
``Model.shard`` (on the last stage the head too: each rank computes a slice of the vocabulary),
and say "ready" on stdout. Rank 0 then runs the node's commands and forwards each one, input
included, to the other ranks over their watch connections, where they wait in a blocking read:
MLX's ring polls its sockets while an all-reduce waits, so a rank idling in one between tokens
would spin a core that the node needs. Any rank exits when its watch connection or its parent's
pipe closes, so a lost rank ends the group.
"""
from __future__ import annotations

import json
import os
import queue
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.base import gather_last_axis

from exo_ctl.api.resources import TensorGroup
from reconciler.runtime import tensor_group as tg

INIT_SECONDS = 120.0  # the whole group must have formed by then
Command = tuple[int, int, list[int], str, tuple[int, ...], bytes]  # as tensor_group.read_command returns it


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _fail(message: str) -> None:
    sys.stderr.write(f"tensor rank: {message}\n")
    sys.stderr.flush()
    os._exit(3)


def _keepalive(conn: socket.socket) -> None:
    """Keepalives find a peer that vanished without closing (a partition) within about 4 s."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 2)):
        if hasattr(socket, option):
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _watch(conn: socket.socket, what: str) -> None:
    """Block until ``conn`` closes, then end this process (the group is broken)."""
    _keepalive(conn)

    def run() -> None:
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        _fail(f"lost {what}: ending the group")
    threading.Thread(target=run, name=f"watch-{what}", daemon=True).start()


def _commands_from(conn: socket.socket) -> "queue.Queue[Command]":
    """A rank other than 0: the commands rank 0 forwards on ``conn``, read by a thread into a queue
    from now on; the connection closing (or a keepalive failing) ends this process."""
    _keepalive(conn)
    commands: queue.Queue[Command] = queue.Queue()

    def run() -> None:
        stream = conn.makefile("rb")
        try:
            while True:
                command = tg.read_command(stream)
                commands.put(command)
                if command[0] == tg.OP_SHUTDOWN:
                    return
        except Exception:  # noqa: BLE001 — closed, reset, or not a command: the group is broken
            pass
        _fail("lost rank 0: ending the group")
    threading.Thread(target=run, name="commands-rank-0", daemon=True).start()
    return commands


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _watch_connections(group: TensorGroup, *, key: bytes, gid: bytes, deadline: float) -> list[socket.socket]:
    """Rank 0 accepts one authenticated watch connection per other rank and returns them in rank
    order, each watched; the others dial rank 0 and return their one connection, not yet read."""
    host, port = _split_address(group.peers[0].address)
    if group.rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port + 1))
        listener.listen(16)
        joined: dict[int, socket.socket] = {}
        while len(joined) < group.size - 1:
            listener.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                _fail(f"ranks {sorted(set(range(1, group.size)) - set(joined))} did not join within {INIT_SECONDS:.0f}s")
            conn.settimeout(5.0)
            try:
                hello = conn.recv(1 + tg.PROOF_BYTES, socket.MSG_WAITALL)
            except OSError:
                hello = b""
            rank = hello[0] if hello else 0
            if len(hello) != 1 + tg.PROOF_BYTES or not 0 < rank < group.size or rank in joined \
                    or hello[1:] != tg.watch_proof(key, group=gid, rank=rank):
                sys.stderr.write("tensor rank 0: refused a watch connection without a valid proof\n")
                conn.close()
                continue
            conn.settimeout(None)
            joined[rank] = conn
            _watch(conn, f"rank {rank}")
        listener.close()
        return [joined[rank] for rank in sorted(joined)]
    while True:
        try:
            conn = socket.create_connection((host, port + 1), timeout=2.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                _fail(f"cannot reach rank 0 at {host}:{port + 1}")
            time.sleep(0.2)
    conn.sendall(bytes([group.rank]) + tg.watch_proof(key, group=gid, rank=group.rank))
    conn.settimeout(None)
    return [conn]


def _join_ring(group: TensorGroup, *, deadline: float) -> Any:
    import mlx.core as mx

    with tempfile.TemporaryDirectory(prefix="exo-ring-") as folder:  # MLX reads it in init only
        hostfile = Path(folder) / "hosts.json"
        hostfile.write_text(json.dumps([[p.address] for p in group.peers]))
        os.environ["MLX_HOSTFILE"], os.environ["MLX_RANK"] = str(hostfile), str(group.rank)
        while True:
            try:
                ring = mx.distributed.init(strict=True, backend="ring")  # binds only to peers[rank]
                break
            except RuntimeError as error:
                if time.monotonic() > deadline:
                    _fail(f"cannot form the ring {[p.address for p in group.peers]}: {error}")
                time.sleep(0.5)
    if ring.size() != group.size or ring.rank() != group.rank:
        _fail(f"the ring has rank {ring.rank()} of {ring.size()}, the spec says {group.rank} of {group.size}")
    return ring


def _authenticate(ring: Any, group: TensorGroup, *, key: bytes, gid: bytes) -> None:
    """Every rank's HMAC over every rank's fresh nonce must verify, or the group is torn down."""
    import mlx.core as mx
    import numpy as np

    def gather(own: bytes, width: int) -> bytes:
        slots = np.zeros(group.size * width, dtype=np.uint8)
        slots[group.rank * width:(group.rank + 1) * width] = np.frombuffer(own, dtype=np.uint8)
        out = mx.distributed.all_sum(mx.array(slots), group=ring)
        mx.eval(out)
        return bytes(np.array(out))

    nonces = gather(os.urandom(tg.NONCE_BYTES), tg.NONCE_BYTES)
    proofs = gather(tg.rank_proof(key, group=gid, rank=group.rank, nonces=nonces), tg.PROOF_BYTES)
    bad = tg.check_proofs(key, group=gid, size=group.size, nonces=nonces, proofs=proofs)
    if bad is not None:
        _fail(f"rank {bad} of the ring did not prove membership of this cluster: tearing the group down")


def _load(config: dict[str, Any], ring: Any) -> Any:
    import mlx.core as mx

    from reconciler.runtime.shard_model import (ComputeThread, ShardModel, _inner, _read_num_layers,
                                                load_stage_model, parameter_bytes)
    from reconciler.runtime.stage_split import find_layout, split_model
    from reconciler.runtime.weight_dtype import apply_dtype

    path, start, end = Path(config["model_path"]), config["start"], config["end"]
    num_layers = _read_num_layers(path)
    model, model_config = load_stage_model(path, tensors=config.get("tensors"))  # a partial copy: what it must hold
    layout = find_layout(model, num_layers=num_layers)
    # The dtype first: mlx-lm's quantize_model converts only plain Linear layers, and its
    # ``shard`` splits quantized ones too (sharded first, a rank's layers stayed in the files' dtype).
    # Lazy, so the layers of other stages are never converted.
    model_config = apply_dtype(model, model_config, dtype=config.get("dtype"), model_path=path)
    model.shard(ring)  # mlx-lm's own tensor-parallel split, before the other stages' layers go
    inlet = split_model(model, layout, start=start, end=end, num_layers=num_layers)
    if end == num_layers:
        _shard_head(model, layout, ring)  # after the dtype: a quantized head stays whole
    for layer in _inner(model, layout).layers[start:end]:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return ShardModel(model=model, config=model_config, start=start, end=end, num_layers=num_layers,
                      nbytes=parameter_bytes(model), compute=ComputeThread("tensor-unused"), layout=layout,
                      inlet=inlet)


def _shard_head(model: nn.Module, layout: Any, ring: Any) -> None:
    """Split the last stage's head by vocabulary rows over the group, with mlx's own
    ``shard_linear``, where the family's ``shard`` left it whole: each rank computes its slice of
    the logits and mlx-lm's ``gather_last_axis`` joins them, so the head's work divides like the
    layers'. A head that is not a plain float ``Linear`` (or tied ``Embedding``), or a vocabulary
    the group does not divide, stays whole: every rank then computes all of it. The planner counts
    the head by the same rule (reconciler.scheduler.tensor_placement._head_splits)."""
    from reconciler.runtime.shard_model import _inner

    size = ring.size()
    if layout.tied:
        inner = _inner(model, layout)
        embedding = inner[layout.embedding_name]
        if type(embedding) is nn.Embedding and embedding.weight.shape[0] % size == 0:
            inner[layout.embedding_name] = VocabShardedEmbedding(embedding, ring)
        return
    owner = model  # the module beside the inner one: where families keep lm_head
    for name in layout.inner_path[:-1]:
        owner = owner[name]
    head = owner.get("lm_head")
    if type(head) is nn.Linear and head.weight.shape[0] % size == 0:
        owner["lm_head"] = VocabShardedHead(head, ring)


class VocabShardedHead(nn.Module):
    """A head whose vocabulary rows are split over ``group`` (mlx's ``shard_linear``,
    all-to-sharded), run on the last position only: the one the stage server samples."""

    def __init__(self, linear: nn.Linear, group: Any) -> None:
        super().__init__()
        self.linear = shard_linear(linear, "all-to-sharded", group=group)
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return gather_last_axis(self.linear(x[..., -1:, :]), self.group)


class VocabShardedEmbedding(nn.Embedding):
    """A tied embedding: the whole table for the lookup, a vocabulary-sharded head for ``as_linear``."""

    def __init__(self, embedding: nn.Embedding, group: Any) -> None:
        rows, dims = embedding.weight.shape
        super().__init__(rows, dims)  # lazy random weights, replaced at once: never computed
        self.weight = embedding.weight
        linear = nn.Linear(dims, rows, bias=False)
        linear.weight = embedding.weight
        self.head = VocabShardedHead(linear, group)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.head(x)


def _forward(shard: Any, x: Any, cache: list[Any]) -> Any:
    """The stage's forward, as ShardModel.forward; on the last stage the last position's logits."""
    from reconciler.runtime.shard_model import _inner
    from reconciler.runtime.stage_split import advance_skipped

    tokens = x
    if shard.inlet is not None:
        shard.inlet.put(x)
        tokens = mx.zeros(x.shape[:2], dtype=mx.int32)
    try:
        run = shard.model if shard.is_last else _inner(shard.model, shard.layout)
        out = run(tokens, cache=cache)
    finally:
        if shard.inlet is not None:
            shard.inlet.put(None)
    advance_skipped(cache, shard.skipped, batch=x.shape[0], length=x.shape[1])
    return out[:, -1:, :] if shard.is_last else out  # the stage server samples the last position only


class _Rank:
    """The model, the caches by id, and the steps of rank 0's commands."""

    def __init__(self, shard: Any, ring: Any, rank: int) -> None:
        self.shard, self.ring, self.rank = shard, ring, rank
        self.caches: dict[int, list[Any]] = {}

    def all_sum(self, array: mx.array) -> mx.array:
        out = mx.distributed.all_sum(array, group=self.ring)
        mx.eval(out)
        return out

    def step(self, command: Command) -> Any:
        """Run one command (every rank runs the same ones, in the same order): the forward's
        output, or None for a command without one."""
        from reconciler.datapath.wire import Tensor, tensor_to_array

        op, cache_id, released, dtype, shape, data = command
        for gone in released:
            self.caches.pop(gone, None)
        if op != tg.OP_FORWARD:
            return None
        cache = self.caches.get(cache_id)
        if cache is None:
            cache = self.caches[cache_id] = self.shard.make_cache()
        out = _forward(self.shard, tensor_to_array(Tensor(dtype, shape, data)), cache)
        mx.eval(out)
        return out

    def lead(self, stdin: Any, reply: Any, followers: list[socket.socket]) -> None:
        """Rank 0: read the node's commands, forward each to the other ranks, run it, answer."""
        from reconciler.datapath.wire import array_to_tensor

        while True:
            try:
                command = tg.read_command(stdin)
            except EOFError:
                return
            op, cache_id, released, dtype, shape, data = command
            frame = tg.encode_command(op=op, cache_id=cache_id, released=released, dtype=dtype, shape=shape,
                                      data=data)
            try:
                for conn in followers:
                    conn.sendall(frame)
            except OSError as error:
                _fail(f"lost a rank: ending the group: {error}")
            if op == tg.OP_SHUTDOWN:
                return
            try:
                wire = array_to_tensor(self.step(command))
                reply.write(tg.encode_reply(dtype=wire.dtype, shape=wire.shape, data=wire.data))
            except Exception as error:  # noqa: BLE001 — the other ranks may be mid-step: end the group
                reply.write(tg.encode_failure(f"{type(error).__name__}: {error}"))
                reply.flush()
                _fail(f"a step failed, ending the group: {type(error).__name__}: {error}")
            reply.flush()

    def follow(self, commands: "queue.Queue[Command]") -> None:
        """Other ranks: run rank 0's commands, as forwarded to this rank, until told to stop."""
        while True:
            command = commands.get()
            if command[0] == tg.OP_SHUTDOWN:
                return
            self.step(command)


def main() -> None:
    _die_with_parent()
    reply = os.fdopen(os.dup(1), "wb")  # the protocol keeps the real stdout; prints go to stderr
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    config = json.loads(stdin.readline())
    group = TensorGroup.model_validate(config["group"])
    key, gid = bytes.fromhex(config["key"]), tg.group_id(group)
    import mlx_lm.utils  # noqa: F401 — seconds to import: before the rendezvous, so the ranks meet in step

    deadline = time.monotonic() + INIT_SECONDS
    connections = _watch_connections(group, key=key, gid=gid, deadline=deadline)
    commands = None if group.rank == 0 else _commands_from(connections[0])
    ring = _join_ring(group, deadline=deadline)
    _authenticate(ring, group, key=key, gid=gid)
    try:
        shard = _load(config, ring)
    except Exception as error:  # noqa: BLE001 — reported to the node as the shard's failure
        _fail(f"cannot load layers [{config['start']}, {config['end']}): {type(error).__name__}: {error}")
    rank = _Rank(shard, ring, group.rank)
    rank.all_sum(mx.zeros((group.size,), dtype=mx.int32))  # every rank has loaded
    reply.write((json.dumps({"ready": True, "nbytes": shard.nbytes}) + "\n").encode())
    reply.flush()
    if commands is None:
        rank.lead(stdin, reply, connections)
        os._exit(0)

    def parent_gone() -> None:
        while stdin.read(1):
            pass
        os._exit(0)
    threading.Thread(target=parent_gone, name="parent", daemon=True).start()
    rank.follow(commands)
    os._exit(0)


if __name__ == "__main__":
    main()
