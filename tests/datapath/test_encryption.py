"""Stage connections over TLS from the cluster CA: the same tokens as plaintext, stage-to-stage hops
included, and peers without TLS or with a certificate from another CA are refused."""
import asyncio
import os
import ssl

import pytest

from reconciler.datapath import PipelineClient, StageLost, StageServer
from reconciler.datapath.wire import HEADER, DataPathTLS
from reconciler.runtime import open_shard
from reconciler.tls import ClusterCA, ensure_node_certificate

PROMPT = [1, 5, 9, 33, 7]


def node_tls(tmp_path, name, ca=None) -> DataPathTLS:
    directory = tmp_path / name
    directory.mkdir()
    return ensure_node_certificate(ca or ClusterCA.create(), data_dir=directory, node=name,
                                   hosts=["127.0.0.1"]).data_path(loopback=True)


class TlsStages:
    def __init__(self, model, ranges, tls_per_stage, token="k"):
        self.model, self.ranges, self.tls, self.token = model, ranges, tls_per_stage, token
        self.servers, self.shards = [], []

    async def __aenter__(self):
        for index, ((start, end), tls) in enumerate(zip(self.ranges, self.tls)):
            shard = await open_shard(self.model, start=start, end=end)
            server = StageServer(host="127.0.0.1", port=0, token=self.token, tls=tls)
            server.add_shard(f"stage{index}", shard)
            await server.start()
            self.shards.append(shard)
            self.servers.append(server)
        return self

    @property
    def route(self):
        return [s.address(f"stage{i}") for i, s in enumerate(self.servers)]

    async def __aexit__(self, *exc):
        for server in self.servers:
            await server.stop()
        for shard in self.shards:
            shard.close()


async def collect(client, route):
    return [t async for t in client.generate(route, PROMPT, max_tokens=6)]


async def test_a_pipeline_over_tls_decodes_the_same_tokens_as_one_process(tiny_model, reference_tokens, tmp_path):
    ca = ClusterCA.create()
    a, b, origin = (node_tls(tmp_path, n, ca) for n in ("a", "b", "origin"))
    async with TlsStages(tiny_model, [(0, 3), (3, 6)], [a, b]) as running, \
            PipelineClient(token="k", tls=origin) as client:
        assert await collect(client, running.route) == reference_tokens(tiny_model, PROMPT, max_tokens=6)


async def test_a_plaintext_client_is_refused_by_a_tls_stage(tiny_model, tmp_path):
    async with TlsStages(tiny_model, [(0, 6)], [node_tls(tmp_path, "a")]) as running, \
            PipelineClient(token="k", dead_after_s=1.0) as client:
        with pytest.raises(StageLost):
            await collect(client, running.route)
        assert running.servers[0].active_requests() == 0


async def test_a_stage_whose_certificate_is_from_another_ca_is_refused(tiny_model, tmp_path):
    async with TlsStages(tiny_model, [(0, 6)], [node_tls(tmp_path, "foreign")]) as running, \
            PipelineClient(token="k", tls=node_tls(tmp_path, "origin")) as client:
        with pytest.raises(StageLost, match="CERTIFICATE_VERIFY_FAILED"):
            await collect(client, running.route)


async def test_garbage_instead_of_a_tls_handshake_is_dropped_and_the_stage_keeps_serving(tiny_model, reference_tokens,
                                                                                           tmp_path):
    ca = ClusterCA.create()
    async with TlsStages(tiny_model, [(0, 6)], [node_tls(tmp_path, "a", ca)]) as running, \
            PipelineClient(token="k", tls=node_tls(tmp_path, "origin", ca)) as client:
        address = running.route[0]
        for junk in (os.urandom(4096), b"\x16\x03\x01" + os.urandom(600)):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(junk)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(HEADER.size), 5) == b""
            writer.close()
        assert await collect(client, running.route) == reference_tokens(tiny_model, PROMPT, max_tokens=6)


def test_loopback_stays_plaintext_unless_asked(tmp_path):
    tls = node_tls(tmp_path, "a")
    default = DataPathTLS(server=tls.server, client=tls.client)
    assert default.client_for("127.0.0.1") is None and default.client_for("localhost") is None
    assert isinstance(default.client_for("10.0.0.2"), ssl.SSLContext)
    assert tls.client_for("127.0.0.1") is tls.client
