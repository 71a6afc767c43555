"""Raw garbage on a real node's data port (api port + 2): random bytes, truncated frames, huge
length fields, HELLOs with a wrong or malformed token. Every such connection is dropped, the
node's memory stays bounded, and it goes on serving."""
from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import openai
import pytest

from reconciler.datapath.wire import HEADER, MAGIC, VERSION, Frame, Kind, encode_frame, hello_frame
from reconciler.node import data_path_token
from harness.cluster import ExoProcess, start_cluster
from harness.serving import apply, wait_serving

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("EXO_FUZZ_SEED", "0")) or random.randrange(1 << 30)
MEMORY_BOUND = 48 << 20  # RSS the node may gain over the whole barrage


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> ExoProcess:
    from exo_ctl.model_builder.build_model import build_model

    cluster = start_cluster(1, tmp_path_factory.mktemp("data-port"))
    try:
        apply(cluster.nodes[0], "solo", build_model("tiny"), strategy="Pack")
        wait_serving(cluster.nodes[0], "solo", stages=1)
        yield cluster.nodes[0]
    finally:
        cluster.close()
        print(cluster.logs()[-8000:])


def rss_bytes(node: ExoProcess) -> int:
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def header(kind: int, *, meta_len: int = 0, data_len: int = 0, dtype: int = 0, ndim: int = 0,
           magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    return HEADER.pack(magic, version, kind, 0, 0, 1, 0, -1, dtype, ndim, 0, 0, 0, 0, meta_len, data_len)


def frame_bytes(frame: Frame) -> bytes:
    head, data = encode_frame(frame)
    return head + bytes(data)


def garbage(token: str, rng: random.Random) -> dict[str, bytes]:
    wrong = hello_frame("not-the-token")
    return {
        "random bytes": rng.randbytes(256 << 10),
        "a truncated header": frame_bytes(hello_frame(token))[: HEADER.size // 2],
        "a truncated HELLO body": header(Kind.HELLO, meta_len=200) + b'{"tok',
        "a 1 TiB data length before HELLO": header(Kind.FORWARD, data_len=1 << 40),
        "a 4 GiB metadata length in HELLO": header(Kind.HELLO, meta_len=(1 << 32) - 1),
        "a HELLO with a wrong token": frame_bytes(wrong),
        "a HELLO whose metadata is a list": header(Kind.HELLO, meta_len=3) + b"[1]",
        "a HELLO whose metadata is not JSON": header(Kind.HELLO, meta_len=4) + b"\xff\xfe{[",
        "bad magic": header(Kind.HELLO, magic=b"GE") + rng.randbytes(64),
        "an unknown protocol version": header(Kind.HELLO, version=99),
        "a 2 GiB tensor after a good HELLO": frame_bytes(hello_frame(token)) + header(Kind.FORWARD, data_len=1 << 31, dtype=4, ndim=1),
        "an unknown frame kind after a good HELLO": frame_bytes(hello_frame(token)) + header(200),
        "random bytes after a good HELLO": frame_bytes(hello_frame(token)) + rng.randbytes(64 << 10),
        "a TOKEN frame sent to a stage": frame_bytes(hello_frame(token)) + frame_bytes(Frame(Kind.TOKEN, 3, token=5)),
    }


async def dropped(port: int, payload: bytes, *, within_s: float) -> bool:
    """Send ``payload`` and hold the connection: True when the node closes it within ``within_s``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            if not chunk:
                return True
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        writer.close()


def mutated_headers(rng: random.Random, count: int) -> list[bytes]:
    """Valid-looking headers with random fields (random kinds, dtypes, shapes and lengths)."""
    out = []
    for _ in range(count):
        fields = [MAGIC, VERSION, rng.randrange(256), rng.randrange(256), rng.randrange(256), rng.getrandbits(64),
                  rng.getrandbits(32), rng.randrange(-(1 << 31), 1 << 31), rng.randrange(256), rng.randrange(8),
                  *(rng.getrandbits(32) for _ in range(4)), rng.getrandbits(32), rng.getrandbits(64)]
        out.append(HEADER.pack(*fields) + rng.randbytes(rng.randrange(64)))
    return out


def test_garbage_on_the_data_port_is_dropped_and_the_node_keeps_serving_with_bounded_memory(node):
    print(f"\ndata-port garbage seed {SEED} (EXO_FUZZ_SEED={SEED} to replay)")
    rng = random.Random(SEED)
    port = node.api_port + 2
    token = data_path_token(node.secret)
    client = openai.OpenAI(base_url=f"{node.api_url}/v1", api_key=node.secret, max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpxClient(trust_env=False))
    expected = client.completions.create(model="solo", prompt="Hello", max_tokens=6, temperature=0).choices[0].text
    before = rss_bytes(node)

    async def barrage() -> dict[str, bool]:
        cases = garbage(token, rng)
        results = {name: await dropped(port, payload, within_s=8) for name, payload in cases.items()}
        # Many at once, each stuck halfway through a header (the HELLO deadline drops them).
        many = await asyncio.gather(*(dropped(port, MAGIC + bytes([VERSION]), within_s=8) for _ in range(150)))
        results["150 connections stuck mid-header"] = all(many)
        fuzzed = await asyncio.gather(*(dropped(port, h, within_s=8) for h in mutated_headers(rng, 200)))
        results["200 random headers"] = all(fuzzed)
        return results

    results = asyncio.run(barrage())
    grown = rss_bytes(node) - before
    print(f"node RSS {before} -> {before + grown} bytes ({grown / 2**20:+.1f} MiB)")
    assert [name for name, was_dropped in results.items() if not was_dropped] == []
    assert node.running
    assert grown < MEMORY_BOUND
    reply = client.completions.create(model="solo", prompt="Hello", max_tokens=6, temperature=0)
    assert reply.choices[0].text == expected
    status, _, held = node.request("GET", "/internal/v1/datapath")
    assert status == 200 and held["activeRequests"] == 0, held
    assert "Traceback" not in node.log_text()
