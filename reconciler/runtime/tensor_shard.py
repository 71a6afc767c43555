"""A node's handle on one rank of a tensor-parallel stage: starts and supervises the rank's
process (``tensor_worker``) and, on rank 0, is what the stage server serves.

Rank 0's handle looks like a ShardModel to the stage server (``forward(x, *, cache)``,
``make_cache()``, the layer range, a compute thread) and serves one request at a time: each
forward is one command to the rank's process, which shares it with the rest of the group.
It has no batching support (``supports_batching`` is False). A rank whose process ends (its peer was lost,
or it failed) fails the forward in flight at once and calls ``on_lost``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Collection

import mlx.core as mx

from exo_ctl.api.resources import TensorGroup
from reconciler.datapath.wire import Tensor, array_to_tensor, tensor_to_array
from reconciler.runtime import tensor_group as tg
from reconciler.runtime.shard_model import ComputeThread, ShardLoadError, _read_num_layers

STDERR_LINES = 20  # of a rank's stderr, kept for the failure message


class TensorCache(list):
    """Rank 0's stand-in for a request's KV cache: the caches live in the rank processes, keyed
    by ``cache_id``; when this object is freed, the ranks drop theirs at the next command."""

    class _State:
        state = mx.array([])  # what the stage server evaluates after a prefill chunk

    def __init__(self, cache_id: int) -> None:
        super().__init__([self._State()])
        self.cache_id = cache_id


class TensorShard:
    """Layers [start, end) of ``num_layers``, run by a tensor-parallel group; rank ``group.rank``."""

    supports_batching = False

    def __init__(self, *, process: subprocess.Popen[bytes], group: TensorGroup, start: int, end: int,
                 num_layers: int, nbytes: int, on_lost: Callable[[str], None] | None,
                 path: Path | None = None) -> None:
        self.process, self.group, self.path = process, group, path  # path: the model directory
        self.start, self.end, self.num_layers, self.nbytes = start, end, num_layers, nbytes
        self.compute = ComputeThread(f"tensor-r{group.rank}-{start}-{end}")
        self._on_lost = on_lost
        self._next_id = 0
        self._released: list[int] = []
        self._closing = False
        self._stderr: list[str] = []
        threading.Thread(target=self._supervise, name=f"tensor-watch-r{group.rank}", daemon=True).start()

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers

    def make_cache(self) -> list[Any]:
        self._next_id += 1
        cache = TensorCache(self._next_id)
        weakref.finalize(cache, self._released.append, self._next_id)
        return cache

    def forward(self, x: mx.array, *, cache: list[Any]) -> mx.array:
        """One chunk through the group (blocking, on the compute thread): token ids or hidden
        states in; hidden states, or the last position's logits on the last stage, out."""
        if self.group.rank != 0:
            raise RuntimeError("only rank 0 of a tensor-parallel group takes requests")
        assert isinstance(cache, TensorCache)
        released, self._released[:] = list(self._released), []
        wire = array_to_tensor(x)
        command = tg.encode_command(op=tg.OP_FORWARD, cache_id=cache.cache_id, released=released,
                                    dtype=wire.dtype, shape=wire.shape, data=wire.data)
        try:
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.write(command)
            self.process.stdin.flush()
            dtype, shape, data = tg.read_reply(self.process.stdout)
        except (OSError, EOFError, ValueError) as error:
            raise RuntimeError(f"the tensor-parallel group ended: {self.failure() or error}") from None
        return tensor_to_array(Tensor(dtype, shape, memoryview(data)))

    def failure(self) -> str:
        code = self.process.poll()
        if code is None:
            return ""
        return f"rank {self.group.rank}'s process exited ({code}): " + " | ".join(self._stderr[-3:])

    def _supervise(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr = (self._stderr + [line.decode(errors="replace").strip()])[-STDERR_LINES:]
        self.process.wait()
        if not self._closing and self._on_lost is not None:
            self._on_lost(self.failure())

    def close(self) -> concurrent.futures.Future[None]:
        """Stop the rank's process (the group's other ranks see it go and end too)."""
        self._closing = True
        if self.process.poll() is None:
            self.process.kill()
        done = self.compute.close()
        return done


def spawn_rank(model_path: Path, *, start: int, end: int, dtype: str | None, group: TensorGroup,
               key: bytes, tensors: Collection[str] | None = None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-m", "reconciler.runtime.tensor_worker"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    config = {"model_path": str(model_path), "start": start, "end": end, "dtype": dtype,
              "group": group.model_dump(mode="json"), "key": key.hex()}
    if tensors is not None:  # a partial copy in the model cache: the tensors it must hold
        config["tensors"] = sorted(tensors)
    assert process.stdin is not None
    process.stdin.write((json.dumps(config) + "\n").encode())  # the key travels on a pipe, never argv
    process.stdin.flush()
    return process


def wait_ready(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The rank's "ready" line (blocking), or ShardLoadError with its last words."""
    assert process.stdout is not None and process.stderr is not None
    line = process.stdout.readline()
    if line:
        return json.loads(line)
    process.wait()
    words = process.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
    raise ShardLoadError(f"tensor-parallel rank exited ({process.returncode}): {' | '.join(words)}")


async def open_tensor_shard(model_path: Path, *, start: int, end: int, dtype: str | None, group: TensorGroup,
                            data_token: str, on_lost: Callable[[str], None] | None = None,
                            tensors: Collection[str] | None = None) -> TensorShard:
    """Start this node's rank of ``group`` and wait until the whole group has formed, proved its
    membership and loaded its layers."""
    num_layers = await asyncio.to_thread(_read_num_layers, Path(model_path))
    if not 0 <= start < end <= num_layers:
        raise ShardLoadError(f"{model_path}: layer range [{start}, {end}) must satisfy 0 <= start < end <= {num_layers}")
    process = spawn_rank(model_path, start=start, end=end, dtype=dtype, group=group, key=tg.group_key(data_token),
                         tensors=tensors)
    try:
        ready = await asyncio.to_thread(wait_ready, process)
    except BaseException:
        if process.poll() is None:
            process.kill()
        raise
    return TensorShard(process=process, group=group, start=start, end=end, num_layers=num_layers,
                       nbytes=int(ready.get("nbytes", 0)), on_lost=on_lost, path=Path(model_path))
