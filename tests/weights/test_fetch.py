"""Fetching a stage's tensors from ordered sources: byte ranges of at most 8 MiB, bounded
parallelism, failover that keeps what arrived, and bytes that fail verification refused and
fetched again elsewhere. Sources here are in-memory twins of a peer and the hub."""
from __future__ import annotations

import asyncio
import hashlib

import pytest

from reconciler.models.model_info import ModelInfoSpec, TensorEntry, WeightFile
from reconciler.weights.fetch import (
    MAX_CHUNK_BYTES,
    Fetcher,
    RateMeter,
    SourceFailed,
    SourceMissing,
    WeightsUnavailable,
    chunks_of,
    missing_parts,
)
from reconciler.weights.peer import TokenBucket

CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "tie_word_embeddings": False}


def model(sizes: dict[str, int], *, digests: bool = True, file_digest: bool = False) -> tuple[ModelInfoSpec, dict[str, bytes]]:
    """A one-file model of tensors of the given sizes, with (optionally) their sha256s."""
    data = {name: bytes((i * 7 + n) % 251 for n in range(size)) for i, (name, size) in enumerate(sorted(sizes.items()))}
    tensors, at = {}, 0
    for name in sorted(data):
        digest = hashlib.sha256(data[name]).hexdigest() if digests else None
        tensors[name] = TensorEntry(dtype="uint8", shape=[len(data[name])], start=at, end=at + len(data[name]), sha256=digest)
        at += len(data[name])
    header = b"{}" + b" " * 6
    whole = len(header).to_bytes(8, "little") + header + b"".join(data[n] for n in sorted(data))
    file = WeightFile(name="model.safetensors", size=len(whole), headerLength=len(header),
                      sha256=hashlib.sha256(whole).hexdigest() if file_digest else None, tensors=tensors)
    info = ModelInfoSpec(source="hf://o/m", origin="hub", config=CONFIG, weightFiles=[file])
    return info, {**data, "": whole}


class Twin:
    """A source holding ``data`` (tensor -> bytes, "" -> the whole original file)."""

    def __init__(self, name: str, data: dict[str, bytes], *, kind: str = "peer", corrupt: set[str] = frozenset(),
                 missing: set[str] = frozenset(), fail_after: int | None = None, short: bool = False,
                 parts: set | None = None) -> None:
        self.name, self.kind, self.data = name, kind, data
        self.corrupt, self.missing, self.fail_after, self.short, self.parts = corrupt, missing, fail_after, short, parts
        self.served = 0  # bytes
        self.tensors: set[str] = set()  # served
        self.calls = 0
        self.active = self.peak = 0

    def holds(self, part) -> bool:
        return self.parts is None or part in self.parts

    async def read(self, *, file, tensor, offset, length):
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0)
            if self.fail_after is not None and self.calls > self.fail_after:
                raise SourceFailed(f"{self.name}: connection lost")
            key = "" if tensor is None else tensor
            if key in self.missing or key not in self.data:
                raise SourceMissing(f"{self.name} does not hold {key!r}")
            piece = bytearray(self.data[key][offset:offset + length])
            if tensor in self.corrupt and piece:
                piece[len(piece) // 2] ^= 0xFF
            if self.short and piece:
                piece = piece[:-1]
            self.served += len(piece)
            self.tensors.add(key)
            return bytes(piece)
        finally:
            self.active -= 1


class Counts:
    def __init__(self) -> None:
        self.fetched: dict[str, int] = {}
        self.refused: dict[str, int] = {}

    def weights_fetched(self, source: str, n: int) -> None:
        self.fetched[source] = self.fetched.get(source, 0) + n

    def weights_refused(self, source: str, n: int) -> None:
        self.refused[source] = self.refused.get(source, 0) + n


SIZES = {"model.embed_tokens.weight": 3000, "model.layers.0.mlp.weight": 2500, "model.layers.1.mlp.weight": 2500,
         "model.norm.weight": 100, "lm_head.weight": 3000}


def test_the_plan_lists_only_the_stage_tensors_of_parts_not_held():
    info, _ = model(SIZES)
    assert missing_parts(info, start=1, end=2, first=False, last=True, held={"head"}) == {
        1: ["model.layers.1.mlp.weight"], "lm_head": ["lm_head.weight"]}
    assert missing_parts(info, start=0, end=1, first=True, last=False, held={0, "embedding"}) == {}


@pytest.mark.parametrize("size", [0, 1, MAX_CHUNK_BYTES, MAX_CHUNK_BYTES + 1, 3 * MAX_CHUNK_BYTES - 5])
def test_a_tensor_is_asked_for_in_ranges_of_at_most_8_mib_that_cover_it_exactly(size):
    chunks = chunks_of("f", "t", size)
    assert all(c.length <= MAX_CHUNK_BYTES for c in chunks)
    assert [c.offset for c in chunks] == list(range(0, max(size, 1), MAX_CHUNK_BYTES))
    assert sum(c.length for c in chunks) == size


async def test_every_tensor_arrives_byte_exact_and_is_counted_for_its_source():
    info, data = model(SIZES)
    peer, counts, seen = Twin("peer a", data), Counts(), []
    fetcher = Fetcher(info=info, sources=[peer], metrics=counts, progress=seen.append, max_chunk=1000)
    got = await fetcher.fetch(SIZES)
    assert got == {t: data[t] for t in SIZES}
    assert counts.fetched == {"peer": sum(SIZES.values())} and counts.refused == {}
    assert seen[-1].done == seen[-1].total == sum(SIZES.values())
    assert [p.done for p in seen] == sorted(p.done for p in seen)


async def test_chunks_in_flight_never_exceed_the_parallel_bound():
    info, data = model(SIZES)
    peer = Twin("peer a", data)
    await Fetcher(info=info, sources=[peer], parallel=2, max_chunk=100).fetch(SIZES)
    assert peer.peak == 2


async def test_a_corrupted_tensor_is_refused_and_fetched_again_from_another_source():
    info, data = model(SIZES)
    bad = Twin("peer bad", data, corrupt={"model.layers.1.mlp.weight"})
    hub, counts = Twin("hub", data, kind="hub"), Counts()
    got = await Fetcher(info=info, sources=[bad, hub], metrics=counts, max_chunk=1000).fetch(SIZES)
    assert got["model.layers.1.mlp.weight"] == data["model.layers.1.mlp.weight"]
    assert counts.refused == {"peer": 2500}
    assert counts.fetched == {"peer": sum(SIZES.values()), "hub": 2500}
    assert hub.served == 2500


async def test_a_source_lost_midway_hands_only_the_remaining_chunks_to_the_next():
    info, data = model({"model.layers.0.mlp.weight": 10_000})
    dying, hub = Twin("peer dying", data, fail_after=3), Twin("hub", data, kind="hub")
    fetcher = Fetcher(info=info, sources=[dying, hub], parallel=1, max_chunk=1000)
    got = await fetcher.fetch(["model.layers.0.mlp.weight"])
    assert got["model.layers.0.mlp.weight"] == data["model.layers.0.mlp.weight"]
    assert (dying.served, hub.served) == (3000, 7000)


async def test_a_peer_without_the_tensor_hands_it_to_the_hub():
    info, data = model(SIZES)
    peer = Twin("peer a", data, missing={"lm_head.weight"})
    hub = Twin("hub", data, kind="hub")
    got = await Fetcher(info=info, sources=[peer, hub]).fetch(SIZES)
    assert got["lm_head.weight"] == data["lm_head.weight"] and hub.served == 3000


async def test_a_peer_that_lists_only_some_parts_is_not_asked_for_others():
    info, data = model(SIZES)
    partial = Twin("peer partial", data, parts={0})
    hub = Twin("hub", data, kind="hub")
    await Fetcher(info=info, sources=[partial, hub]).fetch(SIZES)
    assert partial.served == 2500 and hub.served == sum(SIZES.values()) - 2500


async def test_a_range_of_the_wrong_length_is_refused():
    info, data = model(SIZES)
    short, hub, counts = Twin("peer short", data, short=True), Twin("hub", data, kind="hub"), Counts()
    got = await Fetcher(info=info, sources=[short, hub], metrics=counts, parallel=1).fetch(["model.norm.weight"])
    assert got["model.norm.weight"] == data["model.norm.weight"] and counts.refused == {"peer": 99}


async def test_when_no_source_supplies_a_tensor_the_error_names_its_part_and_the_sources_tried():
    info, data = model(SIZES)
    peer = Twin("peer a", data, missing={"lm_head.weight"})
    dead = Twin("peer b", data, fail_after=0)
    with pytest.raises(WeightsUnavailable) as caught:
        await Fetcher(info=info, sources=[peer, dead], spread_key="x").fetch(SIZES)
    message = str(caught.value)
    assert "part(s) lm_head" in message and "'lm_head.weight'" in message
    assert "peer a: missing" in message and "peer b: peer b: connection lost" in message
    assert set(caught.value.fetched) == set(SIZES) - {"lm_head.weight"}  # what arrived is kept


async def test_a_copy_whose_only_digest_is_the_whole_files_is_checked_against_it():
    info, data = model(SIZES, digests=False, file_digest=True)
    bad = Twin("peer bad", {k: v for k, v in data.items() if k}, corrupt={"model.norm.weight"})
    hub, counts = Twin("hub", data, kind="hub"), Counts()
    got = await Fetcher(info=info, sources=[bad, hub], metrics=counts).fetch(SIZES)
    assert got == {t: data[t] for t in SIZES}
    assert counts.refused == {"peer": sum(SIZES.values())}  # which tensor was bad is unknown: all refused
    assert hub.served == sum(SIZES.values()) + 8 + info.weightFiles[0].headerLength  # + the header


async def test_peers_are_spread_over_by_fetching_node():
    info, data = model({f"model.layers.{i % 2}.t{i}.weight": 10 for i in range(40)})
    firsts = set()
    for node in ("n1", "n2"):
        a, b = Twin("peer a", data), Twin("peer b", data)
        await Fetcher(info=info, sources=[a, b], spread_key=node).fetch(data.keys() - {""})
        firsts.add(frozenset(a.tensors))
        assert a.served > 0 and b.served > 0
    assert len(firsts) == 2


def test_the_token_bucket_admits_at_most_burst_plus_rate_times_elapsed():
    now = [0.0]
    bucket = TokenBucket(rate=1000.0, burst=500.0, clock=lambda: now[0])
    assert bucket.reserve(500) == 0.0
    assert bucket.reserve(1000) == pytest.approx(1.0)  # waits for 1,000 bytes' worth
    now[0] = 1.0
    assert bucket.reserve(1000) == pytest.approx(1.0)  # the debt was paid; this one waits again
    now[0] = 10.0
    assert bucket.reserve(100) == 0.0  # refilled, but only up to the burst
    assert bucket.reserve(400) == 0.0
    assert bucket.reserve(1) > 0.0


def test_sending_as_the_token_bucket_says_bounds_throughput():
    now = [0.0]
    bucket = TokenBucket(rate=4096.0, burst=1024.0, clock=lambda: now[0])
    sent = 0
    for _ in range(100):
        now[0] += bucket.reserve(512)  # the sender sleeps as told, then sends
        sent += 512
        assert sent <= 1024 + 4096 * now[0]
    assert sent / now[0] == pytest.approx(4096, rel=0.05)


def test_the_rate_meter_averages_over_its_recent_window():
    now = [0.0]
    meter = RateMeter(clock=lambda: now[0], window_s=5.0)
    assert meter.rate() == 0.0
    for _ in range(10):
        now[0] += 1.0
        meter.add(100)
    assert meter.rate() == pytest.approx(100.0, rel=0.25)
    now[0] += 10.0
    assert meter.rate() == 0.0
