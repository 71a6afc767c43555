"""What a stage holds for peers stays bounded: a next hop that stops reading fails requests with
an error naming it, prefill is flow-controlled, and a request that makes no progress times out.
Real stage servers with the tiny model; the misbehaving peers are raw sockets."""
import asyncio
import socket

import numpy as np
import pytest

from reconciler.datapath import PipelineClient, RequestStalled, StageServer
from reconciler.datapath.wire import (
    ErrorReport,
    Frame,
    Kind,
    OpenRequest,
    StageAddress,
    Tensor,
    open_connection,
    read_frame,
    write_frame,
)
from reconciler.runtime import open_shard

BOUND = 256 << 10
CHUNK = 512  # rows per FORWARD: 512 x 128 bf16 = 128 KiB of hidden states out of stage 0


def token_chunk(length: int, seed: int) -> Tensor:
    ids = np.random.default_rng(seed).integers(1, 500, size=(1, length)).astype("<i4")
    return Tensor("int32", (1, length), ids.tobytes())


async def stalled_peer():
    """A server that accepts connections and never reads from them (a small receive buffer, so
    the kernel absorbs little)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    accepted = []

    async def hold(reader, writer):
        accepted.append(writer)
        await asyncio.Event().wait()

    server = await asyncio.start_server(hold, sock=sock)
    return server, accepted


async def test_a_next_hop_that_stops_reading_fails_requests_by_name_and_the_stage_buffers_at_most_the_bound(tiny_model):
    peer, accepted = await stalled_peer()
    hop = StageAddress(host="127.0.0.1", port=peer.sockets[0].getsockname()[1], shard="next")
    shard = await open_shard(tiny_model, start=0, end=3)
    server = StageServer(max_buffered_bytes=BOUND)
    server.add_shard("first", shard)
    await server.start()
    try:
        reader, writer = await open_connection("127.0.0.1", server.port, timeout_s=3)
        baseline = server.mlx_active_memory()
        requests = range(1, 41)  # 40 requests of one chunk each: 5 MiB of hidden states for the hop
        for request_id in requests:
            spec = OpenRequest(shard="first", next=hop)
            write_frame(writer, Frame(Kind.OPEN, request_id, meta=spec.model_dump(mode="json")))
            write_frame(writer, Frame(Kind.FORWARD, request_id, tensor=token_chunk(CHUNK, request_id)))
        errors, most = [], 0
        while len(errors) < 10:
            frame = await asyncio.wait_for(read_frame(reader), 60)
            most = max(most, server.buffered_bytes())
            if frame.kind is Kind.ERROR:
                errors.append(ErrorReport.model_validate(frame.meta).message)
        assert f"the next stage at 127.0.0.1:{hop.port} is not reading" in errors[0]
        assert f"bound of {BOUND} bytes" in errors[0]
        # Per connection: unsent hidden states to the hop, and token chunks waiting for compute.
        assert most <= 2 * BOUND, most
        writer.close()
        while server.active_requests() or server.kv_caches():
            await asyncio.sleep(0.05)
        print(f"\nstalled next hop: at most {most} bytes buffered (bound {BOUND} per connection); MLX memory "
              f"{baseline} -> {server.mlx_active_memory()} after {len(errors)} requests failed")
        assert server.mlx_active_memory() <= baseline + (1 << 20)
    finally:
        await server.stop()
        shard.close()
        peer.close()


async def test_prefill_keeps_at_most_the_window_of_chunks_in_the_pipeline(tiny_model, stages, reference_tokens):
    prompt = [int(t) for t in np.random.default_rng(7).integers(1, 500, size=400)]
    expected = reference_tokens(tiny_model, prompt, max_tokens=4, prefill_step_size=16)
    async with stages(tiny_model, [(0, 3), (3, 6)]) as running, \
            PipelineClient(prefill_chunk=16, prefill_window=2) as client:
        most = 0

        async def watch():
            nonlocal most
            while True:
                most = max(most, running.servers[0].buffered_bytes())
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        tokens = [t async for t in client.generate(running.route, prompt, max_tokens=4)]
        watcher.cancel()
    assert tokens == expected  # the same ids as mlx_lm with the same chunking
    assert 0 < most <= 3 * 16 * 4  # a window of 2 chunks + the final one, 16 int32 ids each


async def test_a_request_that_makes_no_progress_fails_after_the_idle_timeout_and_is_freed_on_every_stage(tiny_model):
    async def mute_stage(reader, writer):
        """Answers OPEN and PING like a stage, never computes anything."""
        try:
            while True:
                frame = await read_frame(reader)
                if frame.kind is Kind.OPEN:
                    write_frame(writer, Frame(Kind.OPENED, frame.request_id, stage=frame.stage))
                elif frame.kind is Kind.PING:
                    write_frame(writer, Frame(Kind.PONG, 0))
        except ConnectionError:
            pass

    mute = await asyncio.start_server(mute_stage, "127.0.0.1", 0)
    shard = await open_shard(tiny_model, start=0, end=3)
    server = StageServer()
    server.add_shard("first", shard)
    await server.start()
    route = [server.address("first"), StageAddress(host="127.0.0.1", port=mute.sockets[0].getsockname()[1],
                                                   shard="second")]
    try:
        async with PipelineClient(idle_timeout_s=0.5, heartbeat_interval_s=0.1) as client:
            with pytest.raises(RequestStalled, match=r"no progress for 0.5 s waiting for token 1 .*second@"):
                async for _ in client.generate(route, [1, 2, 3, 4], max_tokens=8):
                    pass
            for _ in range(100):
                if server.active_requests() == 0 and server.kv_caches() == 0:
                    break
                await asyncio.sleep(0.02)
            assert (server.active_requests(), server.kv_caches()) == (0, 0)
    finally:
        await server.stop()
        shard.close()
        mute.close()
