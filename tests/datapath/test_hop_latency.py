"""The pipeline client measures one network hop per stage connection from its heartbeats."""
from __future__ import annotations

import asyncio

import pytest

from reconciler.datapath.pipeline import PipelineClient, RouteError
from reconciler.datapath.stage import StageServer
from reconciler.datapath.wire import StageAddress


async def test_each_heartbeat_answer_reports_half_its_round_trip_as_one_hop() -> None:
    hops: list[float] = []
    async with StageServer(host="127.0.0.1", port=0) as server:
        client = PipelineClient(heartbeat_interval_s=0.02, dead_after_s=2.0)
        client.hop_observer = hops.append
        try:
            # A stage serving no shard refuses the request, but the connection stays open.
            with pytest.raises(RouteError, match="not served here"):
                async for _ in client.generate([StageAddress(host="127.0.0.1", port=server.port, shard="none")],
                                               [1, 2], max_tokens=1):
                    pass
            for _ in range(200):
                if len(hops) >= 3:
                    break
                await asyncio.sleep(0.01)
        finally:
            await client.aclose()
    assert len(hops) >= 3
    assert all(0 < hop < 0.5 for hop in hops)
