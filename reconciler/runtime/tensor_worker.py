"""One rank of a tensor-parallel stage, in its own process (``python -m reconciler.runtime.tensor_worker``).

MLX keeps one ring group per process for its whole life, so every rank runs here, supervised by
its node's shard agent. The process reads a JSON config line on stdin, then: rank 0 dials a
watch connection from every other rank (authenticated), all ranks join the ring and prove their
membership (see ``tensor_group``), load layers [start, end) sharded by mlx-lm's own
``Model.shard``, and say "ready" on stdout. Rank 0 then runs the node's commands and gives the
other ranks the same header and inputs by an all-sum to which they contribute zeros. Any rank
exits when its watch connection or its parent's pipe closes, so a lost rank ends the group.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from exo_ctl.api.resources import TensorGroup
from reconciler.runtime import tensor_group as tg

INIT_SECONDS = 120.0  # the whole group must have formed by then


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _fail(message: str) -> None:
    sys.stderr.write(f"tensor rank: {message}\n")
    sys.stderr.flush()
    os._exit(3)


def _watch(conn: socket.socket, what: str) -> None:
    """Block until ``conn`` closes, then end this process (the group is broken). Keepalives find
    a peer that vanished without closing (a partition) within about 4 s."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 2)):
        if hasattr(socket, option):
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)

    def run() -> None:
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        _fail(f"lost {what}: ending the group")
    threading.Thread(target=run, name=f"watch-{what}", daemon=True).start()


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _watch_connections(group: TensorGroup, *, key: bytes, gid: bytes, deadline: float) -> None:
    """Rank 0 accepts one authenticated watch connection per other rank; the others dial rank 0."""
    host, port = _split_address(group.peers[0].address)
    if group.rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port + 1))
        listener.listen(16)
        joined: set[int] = set()
        while len(joined) < group.size - 1:
            listener.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                _fail(f"ranks {sorted(set(range(1, group.size)) - joined)} did not join within {INIT_SECONDS:.0f}s")
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
            joined.add(rank)
            _watch(conn, f"rank {rank}")
        listener.close()
        return
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
    _watch(conn, "rank 0")


def _join_ring(group: TensorGroup, *, deadline: float) -> Any:
    import mlx.core as mx

    hostfile = Path(tempfile.mkdtemp(prefix="exo-ring-")) / "hosts.json"
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
    from mlx_lm.utils import load_model

    from reconciler.runtime.shard_model import ComputeThread, ShardModel, _inner, _read_num_layers, parameter_bytes
    from reconciler.runtime.stage_split import find_layout, split_model
    from reconciler.runtime.weight_dtype import apply_dtype

    path, start, end = Path(config["model_path"]), config["start"], config["end"]
    num_layers = _read_num_layers(path)
    model, model_config = load_model(path, lazy=True)
    layout = find_layout(model, num_layers=num_layers)
    model.shard(ring)  # mlx-lm's own tensor-parallel split, before the other stages' layers go
    inlet = split_model(model, layout, start=start, end=end, num_layers=num_layers)
    model_config = apply_dtype(model, model_config, dtype=config.get("dtype"), model_path=path)
    for layer in _inner(model, layout).layers[start:end]:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return ShardModel(model=model, config=model_config, start=start, end=end, num_layers=num_layers,
                      nbytes=parameter_bytes(model), compute=ComputeThread("tensor-unused"), layout=layout,
                      inlet=inlet)


def _forward(shard: Any, x: Any, cache: list[Any], *, head: bool) -> Any:
    """The stage's forward (as ShardModel.forward); ``head`` False skips the unsharded lm_head."""
    import mlx.core as mx

    from reconciler.runtime.shard_model import _inner
    from reconciler.runtime.stage_split import advance_skipped

    tokens = x
    if shard.inlet is not None:
        shard.inlet.put(x)
        tokens = mx.zeros(x.shape[:2], dtype=mx.int32)
    try:
        run = shard.model if shard.is_last and head else _inner(shard.model, shard.layout)
        out = run(tokens, cache=cache)
    finally:
        if shard.inlet is not None:
            shard.inlet.put(None)
    advance_skipped(cache, shard.skipped, batch=x.shape[0], length=x.shape[1])
    return out


class _Rank:
    """The model, the caches by id, and the all-sum broadcast of rank 0's commands."""

    def __init__(self, shard: Any, ring: Any, rank: int) -> None:
        self.shard, self.ring, self.rank = shard, ring, rank
        self.caches: dict[int, list[Any]] = {}

    def broadcast(self, array: Any) -> Any:
        import mlx.core as mx

        out = mx.distributed.all_sum(array, group=self.ring)
        mx.eval(out)
        return out

    def step(self, header: list[int], x: Any) -> Any:
        """Run one command's header (already agreed) on input ``x``."""
        op, cache_id, released = header[0], header[1], header[8:8 + header[7]]
        for gone in released:
            self.caches.pop(gone, None)
        if op != tg.OP_FORWARD:
            return None
        cache = self.caches.get(cache_id)
        if cache is None:
            cache = self.caches[cache_id] = self.shard.make_cache()
        out = _forward(self.shard, x, cache, head=self.rank == 0)
        if self.shard.is_last and self.rank == 0:
            out = out[:, -1:, :]  # the stage server samples the last position only
        import mlx.core as mx

        mx.eval(out)
        return out

    def lead(self, stdin: Any, reply: Any) -> None:
        """Rank 0: read the node's commands, share each with the group, answer with the result."""
        from reconciler.datapath.wire import Tensor, array_to_tensor, tensor_to_array

        while True:
            try:
                op, cache_id, released, dtype, shape, data = tg.read_command(stdin)
            except EOFError:
                return
            while len(released) > tg.MAX_RELEASED:  # more releases than one header holds
                self.step(self.share(tg.OP_RELEASE, 0, released[:tg.MAX_RELEASED], "int32", ()), None)
                released = released[tg.MAX_RELEASED:]
            try:
                x = tensor_to_array(Tensor(dtype, shape, data)) if op == tg.OP_FORWARD else None
                inline = x is not None and dtype == "int32" and x.size <= tg.MAX_INLINE
                header = self.share(op, cache_id, released, dtype, shape, inline=x.reshape(-1).tolist() if inline else None)
                if x is not None and not inline:
                    x = self.broadcast(x)
                out = self.step(header, x)
                if op == tg.OP_SHUTDOWN:
                    return
                wire = array_to_tensor(out)
                reply.write(tg.encode_reply(dtype=wire.dtype, shape=wire.shape, data=wire.data))
            except Exception as error:  # noqa: BLE001 — the other ranks may be mid-step: end the group
                reply.write(tg.encode_failure(f"{type(error).__name__}: {error}"))
                reply.flush()
                _fail(f"a step failed, ending the group: {type(error).__name__}: {error}")
            reply.flush()

    def share(self, op: int, cache_id: int, released: list[int], dtype: str, shape: tuple[int, ...], *,
              inline: list[int] | None = None) -> list[int]:
        import mlx.core as mx

        header = [0] * tg.HEADER_INTS
        header[:4] = [op, cache_id, tg.DTYPES.index(dtype), len(shape)]
        header[4:4 + len(shape)] = list(shape)
        header[7] = len(released)
        header[8:8 + len(released)] = released
        if inline is not None:
            header[tg.INLINE_AT] = 1
            header[tg.INLINE_AT + 1:tg.INLINE_AT + 1 + len(inline)] = inline
        self.broadcast(mx.array(header, dtype=mx.int32))
        return header

    def follow(self) -> None:
        """Other ranks: take rank 0's header and input, run the same step, until told to stop."""
        import mlx.core as mx

        while True:
            header = self.broadcast(mx.zeros((tg.HEADER_INTS,), dtype=mx.int32)).tolist()
            if header[0] == tg.OP_SHUTDOWN:
                return
            x = None
            if header[0] == tg.OP_FORWARD:
                shape = tuple(header[4:4 + header[3]])
                if header[tg.INLINE_AT]:
                    size = 1
                    for dim in shape:
                        size *= dim
                    x = mx.array(header[tg.INLINE_AT + 1:tg.INLINE_AT + 1 + size], dtype=mx.int32).reshape(shape)
                else:
                    x = self.broadcast(mx.zeros(shape, dtype=getattr(mx, tg.DTYPES[header[2]])))
            self.step(header, x)


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
    _watch_connections(group, key=key, gid=gid, deadline=deadline)
    ring = _join_ring(group, deadline=deadline)
    _authenticate(ring, group, key=key, gid=gid)
    try:
        shard = _load(config, ring)
    except Exception as error:  # noqa: BLE001 — reported to the node as the shard's failure
        _fail(f"cannot load layers [{config['start']}, {config['end']}): {type(error).__name__}: {error}")
    rank = _Rank(shard, ring, group.rank)
    import mlx.core as mx

    rank.broadcast(mx.zeros((group.size,), dtype=mx.int32))  # every rank has loaded
    reply.write((json.dumps({"ready": True, "nbytes": shard.nbytes}) + "\n").encode())
    reply.flush()
    if group.rank == 0:
        rank.lead(stdin, reply)
        os._exit(0)

    def parent_gone() -> None:
        while stdin.read(1):
            pass
        os._exit(0)
    threading.Thread(target=parent_gone, name="parent", daemon=True).start()
    rank.follow()
    os._exit(0)


if __name__ == "__main__":
    main()
