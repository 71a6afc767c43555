"""The distributed backend: a request for a deployment runs through the pipeline of its Shards,
wherever they are loaded. Any node can be the entry: it tokenizes, picks a replica whose shards
are all Ready, and drives the stage route; hidden states travel stage to stage, and the last
stage sends the sampled token ids back here."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.controllers.deployment_status import placement_revision, shard_ready
from reconciler.datapath import pipeline as datapath
from reconciler.datapath.wire import DataPathTLS, StageAddress
from reconciler.inference.backend import ModelCard, NotReady, PipelineError, SamplingParams
from reconciler.inference.context import read_context_length
from reconciler.models.memory import reserved_context_length
from reconciler.models.model_info import MODEL_INFO_KIND, ModelInfoSpec, model_info_name
from reconciler.runtime.model_files import TOKENIZER_PATTERNS, ModelFilesError, local_model_path, original_copy
from reconciler.store.base import Store
from reconciler.store.state import StoreState

if TYPE_CHECKING:
    from reconciler.weights.supply import WeightSupply

log = logging.getLogger(__name__)
RETRY_AFTER = 2.0
BUSY_RETRY_AFTER = 1.0  # a request slot frees when any running request ends
SHUTTING_DOWN = "this node is shutting down; send the request to another node of the cluster"
TOKENIZER_RETRY_S = 10.0  # a tokenizer that failed to load is tried again after this long


def _epoch(timestamp: str | None) -> int:
    if not timestamp:
        return 0
    return int(datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=None).timestamp())


def _ready_condition(deployment: dict[str, Any]) -> dict[str, Any]:
    for condition in (deployment.get("status") or {}).get("conditions", []):
        if condition["type"] == "Ready":
            return condition
    return {"status": "Unknown", "reason": "Pending", "message": "not reconciled yet"}


def _not_ready_reason(deployment: dict[str, Any]) -> str:
    ready = _ready_condition(deployment)
    if ready["status"] == "True":  # the status lags: a shard is moving or reloading right now
        return "its shards are being placed again (a shard is moving or loading)"
    return f"{ready.get('reason')}: {ready.get('message')}"


def deployment_name(deployment: dict[str, Any]) -> str:
    """What clients put in ``model``: the name, or ``namespace/name`` outside the default namespace."""
    meta = deployment["metadata"]
    return meta["name"] if meta.get("namespace", "default") == "default" else f"{meta['namespace']}/{meta['name']}"


def ready_routes(deployment: dict[str, Any], shards: list[dict[str, Any]]) -> list[list[StageAddress]]:
    """Stage routes of every replica whose shards are all Ready, in stage order: per replica, its
    newest placement revision that is whole and Ready (an older one serves until then)."""
    key = f"{deployment['metadata'].get('namespace', 'default')}/{deployment['metadata']['name']}"
    replicas: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for shard in shards:
        spec = shard["spec"]
        follower = (spec.get("tensor") or {}).get("rank", 0) > 0  # a tensor rank the stage's rank 0 drives
        if spec["deployment"] == key and spec.get("deploymentUid") == deployment["metadata"].get("uid") and not follower:
            replicas.setdefault((spec["replica"], placement_revision(shard)), []).append(shard)
    routes, routed = [], set()
    for replica, revision in sorted(replicas, key=lambda k: (k[0], -k[1])):
        stages = sorted(replicas[(replica, revision)], key=lambda s: s["spec"]["index"])
        if replica in routed or len(stages) != stages[0]["spec"]["stages"] or not all(shard_ready(s) for s in stages):
            continue
        routed.add(replica)
        route = []
        for shard in stages:
            host, _, port = shard["status"]["dataEndpoint"].rpartition(":")
            route.append(StageAddress(host=host, port=int(port), shard=shard["metadata"]["name"]))
        routes.append(route)
    return routes


class ClusterModel:
    """One deployment's handle (``ModelHandle``): its tokenizer and a route through its stages."""

    def __init__(self, *, tokenizer: Any, route: list[StageAddress], client: datapath.PipelineClient,
                 context_length: int | None = None, closing: Callable[[], bool] = lambda: False,
                 embeddings: bool = False, max_requests: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_requests = max_requests  # requests every stage reserved KV cache for (None: unbounded)
        self.embeddings = embeddings  # the deployment serves /v1/embeddings (spec.serving.embeddings)
        self._closing = closing  # true once the node is shutting down
        self.context_length = context_length
        self.route = route
        self._client = client

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int) -> AsyncIterator[int]:
        tokens = self._client.generate(self.route, list(prompt_ids), max_tokens=max_tokens, sampling=params,
                                       stop_ids=self.tokenizer.eos_token_ids)
        try:
            async for token in tokens:
                yield token
        except datapath.StagesBusy as error:  # every request slot the plan reserved is taken
            raise NotReady(f"model busy: {error}", retry_after=BUSY_RETRY_AFTER) from None
        except datapath.RouteError as error:
            if self._closing():  # the node closed the pipeline client on its way out
                raise NotReady(SHUTTING_DOWN, retry_after=RETRY_AFTER) from None
            raise PipelineError(str(error)) from None
        finally:
            await tokens.aclose()

    async def embed(self, prompt_ids: list[int]) -> list[float]:
        """The mean of the prompt's normed last hidden states, through the pipeline."""
        try:
            return await self._client.embed(self.route, prompt_ids)
        except datapath.StagesBusy as error:
            raise NotReady(f"model busy: {error}", retry_after=BUSY_RETRY_AFTER) from None
        except datapath.RouteError as error:
            if self._closing():
                raise NotReady(SHUTTING_DOWN, retry_after=RETRY_AFTER) from None
            raise PipelineError(str(error)) from None


class ClusterBackend:
    """``InferenceBackend`` over the store's ModelDeployments and Shards."""

    def __init__(self, *, store: Store, data_token: str | None = None, idle_timeout_s: float = 60.0,
                 prefill_chunk: int = datapath.PREFILL_CHUNK, data_tls: DataPathTLS | None = None,
                 monotonic: Callable[[], float] = time.monotonic, supply: WeightSupply | None = None) -> None:
        """``supply``: fetches the tokenizer files of a model this node has no copy of (from peers
        or the hub, as its ModelInfo lists them); None: only this node's copies or the hub."""
        self.store = store
        self.supply = supply
        self._monotonic = monotonic
        self._failed_at: dict[tuple[str, str | None], float] = {}  # tokenizers that did not load, and when
        self.client = datapath.PipelineClient(token=data_token, idle_timeout_s=idle_timeout_s,
                                              prefill_chunk=prefill_chunk, tls=data_tls)
        self._tokenizers: dict[tuple[str, str | None], Any] = {}
        self._loading: dict[tuple[str, str | None], asyncio.Task[None]] = {}
        self._round_robin = itertools.count()
        self._seen_revision = store.revision
        self._unsubscribe = store.add_listener(self._on_change)
        self.closing = False

    def _on_change(self, state: StoreState) -> None:
        """Prefetch when a deployment changed (not on every lease renewal), and drop the
        tokenizers no deployment uses any more."""
        events = state.events_after(self._seen_revision)
        self._seen_revision = state.revision
        if any(event.object.get("kind") == "ModelDeployment" for event in events):
            self.prefetch_tokenizers()

    def _deployments(self) -> list[dict[str, Any]]:
        return self.store.list("ModelDeployment")[0]

    def models(self) -> list[ModelCard]:
        cards = []
        for deployment in self._deployments():
            ready = _ready_condition(deployment)
            state = "Ready" if ready["status"] == "True" else f"{ready.get('reason', 'Pending')}: {ready.get('message', '')}".rstrip(": ")
            cards.append(ModelCard(name=deployment_name(deployment), ready=ready["status"] == "True", state=state,
                                   created=_epoch(deployment["metadata"].get("creationTimestamp")),
                                   source=deployment["spec"]["model"]["source"]))
        return cards

    def resolve(self, model: str) -> ClusterModel:
        deployment = next((d for d in self._deployments() if deployment_name(d) == model), None)
        if deployment is None:
            raise KeyError(model)
        if self.closing:
            raise NotReady(SHUTTING_DOWN, retry_after=RETRY_AFTER)
        all_shards = self.store.list("Shard")[0]
        routes = ready_routes(deployment, all_shards)
        if not routes:
            raise NotReady(f"model {model!r} is not ready: {_not_ready_reason(deployment)}", retry_after=RETRY_AFTER)
        spec = deployment["spec"]["model"]
        tokenizer, context_length = self._tokenizer(spec["source"], spec.get("revision"))
        # Never more than every stage reserved KV cache for (nor more than the model's own).
        reserved = reserved_context_length((deployment["spec"].get("resources") or {}).get("contextLength"),
                                           context_length)
        context_length = min(reserved, context_length) if context_length else reserved
        route = routes[next(self._round_robin) % len(routes)]
        on_route = {address.shard for address in route}
        limits = [s["spec"]["maxRequests"] for s in all_shards
                  if s["metadata"]["name"] in on_route and s["spec"].get("maxRequests")]
        return ClusterModel(tokenizer=tokenizer, route=route, client=self.client, context_length=context_length,
                            closing=lambda: self.closing, max_requests=min(limits) if limits else None,
                            embeddings=bool((deployment["spec"].get("serving") or {}).get("embeddings")))

    def _tokenizer(self, source: str, revision: str | None) -> Any:
        key = (source, revision)
        if key not in self._tokenizers:
            # Normally prefetched off the loop when the deployment appeared; this is the fallback:
            # a copy on this node's disk is read now, the files of any other are fetched meanwhile.
            has_copy = original_copy(source, revision=revision, weights=False) is not None
            if self._fetches_tokenizer(key, has_copy=has_copy):
                failed_at = self._failed_at.get(key)
                retry = failed_at is None or self._monotonic() - failed_at >= TOKENIZER_RETRY_S
                if key not in self._loading and retry:
                    self._loading[key] = asyncio.get_running_loop().create_task(self._prefetch(key),
                                                                                name=f"tokenizer:{source}")
                raise NotReady(f"model {source!r}: this node is fetching its tokenizer", retry_after=RETRY_AFTER)
            try:
                self._tokenizers[key] = _load_tokenizer(source, revision)
            except (ModelFilesError, OSError, ValueError) as error:
                raise NotReady(f"model {source!r}: tokenizer unavailable on this node: {error}",
                               retry_after=RETRY_AFTER) from None
        return self._tokenizers[key]

    def _model_info(self, key: tuple[str, str | None]) -> ModelInfoSpec | None:
        stored = self.store.get((MODEL_INFO_KIND, "", model_info_name(*key)))
        return ModelInfoSpec.model_validate(stored["spec"]) if stored is not None else None

    def _fetches_tokenizer(self, key: tuple[str, str | None], *, has_copy: bool) -> bool:
        """Whether the supply fetches the model's tokenizer files: this node has no copy of its own
        (one is used in place) and the cluster has the model's ModelInfo."""
        return self.supply is not None and not has_copy \
            and self.store.get((MODEL_INFO_KIND, "", model_info_name(*key))) is not None

    async def _read_tokenizer(self, key: tuple[str, str | None]) -> tuple[Any, int | None]:
        has_copy = await asyncio.to_thread(original_copy, key[0], revision=key[1], weights=False) is not None
        info = self._model_info(key) if self._fetches_tokenizer(key, has_copy=has_copy) else None
        if info is not None and self.supply is not None:
            return await asyncio.to_thread(_tokenizer_in, await self.supply.side_dir(info))
        return await asyncio.to_thread(_load_tokenizer, *key)

    def prefetch_tokenizers(self) -> None:
        """Load, off the event loop, the tokenizer of every deployment that is Ready (only then
        can this node be asked to serve it), so requests never wait for one."""
        deployments = self._deployments()
        wanted = {(d["spec"]["model"]["source"], d["spec"]["model"].get("revision")) for d in deployments}
        for key in list(self._tokenizers):
            if key not in wanted:
                del self._tokenizers[key]
        for deployment in deployments:
            if _ready_condition(deployment)["status"] != "True":
                continue
            spec = deployment["spec"]["model"]
            key = (spec["source"], spec.get("revision"))
            failed_at = self._failed_at.get(key)
            if failed_at is not None and self._monotonic() - failed_at < TOKENIZER_RETRY_S:
                continue  # store changes come every second (leases); do not retry on each
            if key not in self._tokenizers and key not in self._loading:
                self._loading[key] = asyncio.get_running_loop().create_task(self._prefetch(key), name=f"tokenizer:{key[0]}")

    async def _prefetch(self, key: tuple[str, str | None]) -> None:
        try:
            self._tokenizers[key] = await self._read_tokenizer(key)
            self._failed_at.pop(key, None)
        except Exception as error:  # reported to clients when they ask for the model
            if key not in self._failed_at:
                log.info("tokenizer for %s not loaded yet: %s", key[0], error)
            self._failed_at[key] = self._monotonic()
        finally:
            self._loading.pop(key, None)

    async def close(self) -> None:
        """Fail every generation in flight (with NotReady: this node is shutting down) and refuse new ones."""
        self.closing = True
        self._unsubscribe()
        for task in list(self._loading.values()):
            task.cancel()
        await self.client.aclose()


def _load_tokenizer(source: str, revision: str | None) -> tuple[Any, int | None]:
    """The tokenizer and the context length of this node's copy of ``source``, or of the hub's
    tokenizer files (an entry node needs the tokenizer only: never download weights for it)."""
    return _tokenizer_in(local_model_path(source, revision=revision, patterns=TOKENIZER_PATTERNS))


def _tokenizer_in(path: Path) -> tuple[Any, int | None]:
    """The tokenizer and the context length (from config.json, beside the tokenizer) in ``path``."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(path), read_context_length(path)
