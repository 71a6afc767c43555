"""Prometheus metrics of one node, in a registry of its own (several nodes may share a process in
tests). Event counters and histograms are updated where things happen; gauges that describe the
current state (Raft, objects, nodes, shards) are read from the store at scrape time."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
HOP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
PHASES = ("Pending", "Downloading", "Loading", "Ready", "Failed")
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class NodeMetrics:
    def __init__(self, *, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.raft_apply_seconds = Histogram(
            "exo_raft_apply_seconds", "Time from proposing a command to seeing it committed and applied",
            buckets=LATENCY_BUCKETS, registry=r)
        self.api_requests = Counter(
            "exo_api_requests", "HTTP requests served", ["route", "method", "code"], registry=r)
        self.api_request_seconds = Histogram(
            "exo_api_request_seconds", "HTTP request latency", ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.watch_streams = Gauge("exo_watch_streams", "Open watch streams", registry=r)
        self.reconciles = Counter(
            "exo_reconcile", "Controller passes", ["controller", "result"], registry=r)
        self.reconcile_seconds = Histogram(
            "exo_reconcile_seconds", "Controller pass duration", ["controller"], buckets=LATENCY_BUCKETS, registry=r)
        self.shard_load_seconds = Histogram(
            "exo_shard_load_seconds", "Time to load a shard's layers", ["deployment"], buckets=LOAD_BUCKETS, registry=r)
        self.inference_requests = Counter(
            "exo_inference_requests", "Inference requests finished", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("exo_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generated_tokens = Counter("exo_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.time_to_first_token = Histogram(
            "exo_time_to_first_token_seconds", "Time to first token", ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.inter_token_seconds = Histogram(
            "exo_inter_token_seconds", "Time between generated tokens", ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.hop_seconds = Histogram(
            "exo_pipeline_hop_seconds", "Network time of one hidden-state hop between stages",
            buckets=HOP_BUCKETS, registry=r)
        self.inference_in_flight = Gauge("exo_inference_in_flight", "Inference requests in progress", ["model"], registry=r)
        self.inference_queued = Gauge(
            "exo_inference_queued", "Inference requests waiting for a generation slot on this entry node", registry=r)
        self.inference_rejected = Counter(
            "exo_inference_rejected", "Inference requests refused with 429 (slots and queue full)", registry=r)

        self.stage_batch_size = Histogram(
            "exo_stage_batch_size", "Requests in one compute step of a stage (decode steps run batched)",
            ["shard"], buckets=BATCH_BUCKETS, registry=r)
        self.stage_queue_wait_seconds = Histogram(
            "exo_stage_queue_wait_seconds", "Time a received chunk waited for its stage's compute thread",
            ["shard"], buckets=LATENCY_BUCKETS, registry=r)
        self.weights_fetched_bytes = Counter(
            "exo_weights_fetched_bytes", "Weight bytes this node fetched and verified, by source (peer, hub)",
            ["source"], registry=r)
        self.weights_refused_bytes = Counter(
            "exo_weights_refused_bytes", "Weight bytes this node received and refused (failed verification), by source",
            ["source"], registry=r)
        self.weights_served_bytes = Counter(
            "exo_weights_served_bytes", "Weight bytes this node served to other members", registry=r)

    def weights_fetched(self, source: str, n: int) -> None:
        self.weights_fetched_bytes.labels(source).inc(n)

    def weights_refused(self, source: str, n: int) -> None:
        self.weights_refused_bytes.labels(source).inc(n)

    def weights_served(self, n: int) -> None:
        self.weights_served_bytes.inc(n)

    def watch_model_cache(self, cached: Callable[[], list[dict[str, Any]]]) -> None:
        """exo_model_cache_bytes: what the model cache's partial copies hold on disk, read at scrape time."""
        def collect() -> Iterable[GaugeMetricFamily]:
            family = gauge("exo_model_cache_bytes", "Bytes of model files in this node's model cache")
            family.add_metric([], sum(int(model.get("bytes", 0)) for model in cached()))
            return [family]

        self.add_state_collector(collect)

    def observe_stage_step(self, shard: str, rows: int, waits: list[float]) -> None:
        self.stage_batch_size.labels(shard).observe(rows)
        histogram = self.stage_queue_wait_seconds.labels(shard)
        for wait in waits:
            histogram.observe(wait)

    def watch_stage_requests(self, requests: Callable[[], dict[str, int]]) -> None:
        """exo_stage_requests_in_flight{shard}, read from the stage server at scrape time."""
        def collect() -> Iterable[GaugeMetricFamily]:
            family = gauge("exo_stage_requests_in_flight", "Requests open on a stage of this node", ["shard"])
            for shard, count in sorted(requests().items()):
                family.add_metric([shard], count)
            return [family]

        self.add_state_collector(collect)

    def observe_reconcile(self, controller: str, result: str, seconds: float) -> None:
        self.reconciles.labels(controller, result).inc()
        self.reconcile_seconds.labels(controller).observe(seconds)

    def add_state_collector(self, collect: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        self.registry.register(_FunctionCollector(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return self._collect()

    def describe(self) -> Iterable[Any]:
        return []


def gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels or [])
