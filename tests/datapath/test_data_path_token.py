"""Stage servers that require the cluster's data-path token serve only peers that present it,
including the stage-to-stage hops, and refuse everyone else before reading any request."""
import asyncio

import pytest

from reconciler.datapath import PipelineClient, StageLost
from reconciler.datapath.wire import HEADER, Frame, Kind, encode_frame

PROMPT = [1, 5, 9, 33, 7]


async def collect(client, route):
    return [token async for token in client.generate(route, PROMPT, max_tokens=8)]


async def test_a_client_with_the_token_decodes_through_stages_that_require_it(tiny_model, stages, reference_tokens):
    expected = reference_tokens(tiny_model, PROMPT, max_tokens=8)
    async with stages(tiny_model, [(0, 3), (3, 6)], token="s3cret") as running, \
            PipelineClient(token="s3cret") as client:
        assert await collect(client, running.route) == expected


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_a_client_without_the_right_token_is_refused_quickly(tiny_model, stages, token):
    async with stages(tiny_model, [(0, 6)], token="s3cret") as running, \
            PipelineClient(token=token, dead_after_s=1.0) as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(StageLost):
            await collect(client, running.route)
        assert asyncio.get_running_loop().time() - started < 5
        assert running.active_requests() == [0]


async def test_a_refused_peer_never_gets_an_answer_to_its_frames(tiny_model, stages):
    async with stages(tiny_model, [(0, 6)], token="s3cret") as running:
        address = running.route[0]
        reader, writer = await asyncio.open_connection(address.host, address.port)
        header, body = encode_frame(Frame(Kind.PING, 0))
        writer.write(header + bytes(body))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(HEADER.size), 5) == b""  # closed, no PONG
        writer.close()


async def test_connections_beyond_the_limit_waiting_for_hello_are_dropped_at_once(tiny_model, stages):
    from reconciler.datapath.stage import MAX_UNAUTHENTICATED

    async with stages(tiny_model, [(0, 6)], token="s3cret") as running:
        address = running.route[0]
        waiting = [await asyncio.open_connection(address.host, address.port) for _ in range(MAX_UNAUTHENTICATED)]
        await asyncio.sleep(0.3)  # every one of them is now waiting for its HELLO
        reader, writer = await asyncio.open_connection(address.host, address.port)
        assert await asyncio.wait_for(reader.read(HEADER.size), 5) == b""  # dropped before the HELLO deadline
        assert not any(r.at_eof() for r, _ in waiting)
        for _, w in waiting + [(reader, writer)]:
            w.close()
