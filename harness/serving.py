"""Helpers for tests that serve a model through real ``exo`` processes: apply a deployment, wait
until its pipeline is Ready, read its route, and compare with single-process mlx_lm."""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.cluster import Cluster, ExoProcess, running_cluster

API = "/apis/exo.dev/v1alpha1"
DEPLOYMENTS = f"{API}/namespaces/default/modeldeployments"
APPLY = "application/apply-patch+yaml"


def manifest(name: str, source: Path, *, strategy: str = "Spread", selector: dict[str, str] | None = None,
             spec: str = "") -> str:
    """A ModelDeployment's YAML; ``spec``: more lines of its spec, indented two spaces."""
    lines = ["apiVersion: exo.dev/v1alpha1", "kind: ModelDeployment", f"metadata:\n  name: {name}", "spec:",
             f"  model:\n    source: {source}", f"  placement:\n    strategy: {strategy}"]
    if selector:
        lines.append("    nodeSelector:")
        lines += [f'      {key}: "{value}"' for key, value in selector.items()]
    return "\n".join(lines) + "\n" + spec


def apply(node: ExoProcess, name: str, source: Path, **placement: Any) -> None:
    status, _, body = node.request("PATCH", f"{DEPLOYMENTS}/{name}", body=manifest(name, source, **placement),
                                   content_type=APPLY)
    assert status in (200, 201), body


@dataclass(frozen=True)
class Served:
    """A deployment a test cluster serves: its model, how many Ready stages it must reach, and its
    placement (``manifest``'s keywords)."""
    source: Path
    stages: int
    strategy: str = "Spread"
    selector: dict[str, str] | None = None
    spec: str = ""


@contextmanager
def serving_cluster(root: Path, *, nodes: int, serve: Mapping[str, Served], extra_args: Sequence[str] = (),
                    timeout: float = 60.0) -> Iterator[Cluster]:
    """``nodes`` real nodes, every one Ready, serving each of ``serve`` (applied through node0);
    at the end every node is killed and the logs printed (pytest shows them when a test failed)."""
    with running_cluster(nodes, root, extra_args=extra_args) as cluster:
        wait_nodes_ready(cluster, nodes)
        for name, served in serve.items():
            apply(cluster.nodes[0], name, served.source, strategy=served.strategy, selector=served.selector,
                  spec=served.spec)
        for name, served in serve.items():
            wait_serving(cluster.nodes[0], name, stages=served.stages, timeout=timeout)
        yield cluster


def wait_nodes_ready(cluster: Cluster, count: int, *, timeout: float = 20.0) -> None:
    """Every one of ``count`` Node objects Ready, as a running node sees them."""
    deadline = time.monotonic() + timeout
    while True:
        node = next(n for n in cluster.nodes if n.running)
        status, _, listing = node.request("GET", f"{API}/nodes")
        ready = [n for n in listing.get("items", []) if _condition(n, "Ready")] if status == 200 else []
        if len(ready) >= count:
            return
        assert time.monotonic() < deadline, f"only {len(ready)}/{count} nodes Ready\n{cluster.logs()}"
        time.sleep(0.1)


def shards_of(node: ExoProcess, deployment: str) -> list[dict[str, Any]]:
    status, _, listing = node.request("GET", f"{API}/shards")
    assert status == 200, listing
    return _ours(listing, deployment)


def _ours(listing: dict[str, Any], deployment: str) -> list[dict[str, Any]]:
    """The deployment's shards in a Shard list, in stage order."""
    ours = [s for s in listing["items"] if s["spec"]["deployment"] == f"default/{deployment}"]
    return sorted(ours, key=lambda s: s["spec"]["index"])


def wait_serving(node: ExoProcess, deployment: str, *, stages: int, timeout: float = 30.0,
                 avoid: str | None = None) -> list[dict[str, Any]]:
    """Wait until ``deployment`` is Ready with ``stages`` Ready shards (none on ``avoid``) and
    ``GET /v1/models`` through ``node`` says so; returns its shards in stage order. Reads that
    ``node`` refuses meanwhile (503 while the cluster elects a leader after a member died) are
    tried again."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, listing = node.request("GET", f"{API}/shards")
        if status == 503:
            assert time.monotonic() < deadline, f"{node.name} refused reads for {timeout}s: {listing}"
            time.sleep(0.1)
            continue
        assert status == 200, listing
        shards = _ours(listing, deployment)
        code, _, deployed = node.request("GET", f"{DEPLOYMENTS}/{deployment}")
        deployed = deployed if code == 200 else {}
        _, _, models = node.request("GET", "/v1/models")
        card = next((m for m in models.get("data", []) if m["id"] == deployment), None)
        settled = (len(shards) == stages and all(_shard_ready(s) for s in shards)
                   and all(s["spec"]["nodeName"] != avoid for s in shards)
                   and _condition(deployed, "Ready") and card is not None and card["ready"])
        if settled:
            return shards
        assert time.monotonic() < deadline, (f"{deployment} not serving with {stages} stages: "
                                             f"{[(s['spec']['nodeName'], s.get('status')) for s in shards]}")
        time.sleep(0.1)


def client_for(node: ExoProcess, *, timeout: float = 60) -> Any:
    """The official ``openai`` client against ``node``: no retries, no proxies from the environment."""
    import openai  # deliberately not exo_ctl.http: these tests check compatibility with the real SDK

    return openai.OpenAI(base_url=f"{node.api_url}/v1", api_key=node.secret, max_retries=0, timeout=timeout,
                         http_client=openai.DefaultHttpxClient(trust_env=False))


def node_named(cluster: Cluster, name: str) -> ExoProcess:
    return next(n for n in cluster.nodes if n.name == name)


def _condition(obj: dict[str, Any], kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in (obj.get("status") or {}).get("conditions", []))


def _shard_ready(shard: dict[str, Any]) -> bool:
    status = shard.get("status") or {}
    return status.get("phase") == "Ready" and status.get("observedGeneration") == shard["metadata"]["generation"]


class Reference:
    """Single-process mlx_lm on the same model: greedy token ids and the text the API must send."""

    def __init__(self, model_path: Path) -> None:
        import mlx_lm

        self.model, self.tokenizer = mlx_lm.load(str(model_path))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def greedy(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """mlx_lm's greedy ids, cut before the first end-of-sequence id (which the API never sends)."""
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        import mlx.core as mx

        ids = []
        for token, _ in generate_step(mx.array(prompt_ids), self.model, max_tokens=max_tokens,
                                      sampler=make_sampler(temp=0.0)):
            if int(token) in self.tokenizer.eos_token_ids:
                break
            ids.append(int(token))
        return ids

    def text(self, ids: list[int]) -> str:
        detokenizer = self.tokenizer.detokenizer
        detokenizer.reset()
        for token in ids:
            detokenizer.add_token(token)
        detokenizer.finalize()
        return detokenizer.text
