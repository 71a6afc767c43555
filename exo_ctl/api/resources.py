"""The API kinds of exo.dev/v1alpha1: ModelDeployment (user-written), Node and Shard (cluster-written)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from exo_ctl.api.meta import API_VERSION, Condition, Frozen, ObjectMeta, Quantity, parse_quantity

DEFAULT_NAMESPACE = "default"


# --- ModelDeployment -------------------------------------------------------------------------

class ModelSource(Frozen):
    source: str = Field(description="hf://org/name, or a local path to a model in Hugging Face layout")
    revision: str | None = None
    dtype: Literal["bfloat16", "float16", "float32", "4bit", "8bit"] | None = None

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        if value.startswith("hf://"):
            repo = value[len("hf://"):]
            if repo.count("/") != 1 or not all(repo.split("/")):
                raise ValueError(f"{value!r}: an hf:// source is hf://ORG/NAME")
        elif "://" in value:
            raise ValueError(f"{value!r}: only hf:// sources and local paths are supported")
        return value


class Placement(Frozen):
    """Which nodes hold the model's layers."""
    strategy: Literal["Pack", "Spread"] = Field(
        default="Pack", description="Pack: the fewest nodes that fit; Spread: every eligible node")
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="labels a node must have to get layers")
    minNodes: int = Field(default=1, ge=1, description="place on at least this many nodes")
    maxNodes: int | None = Field(default=None, ge=1, description="place on at most this many nodes")

    @model_validator(mode="after")
    def _bounds(self) -> "Placement":
        if self.maxNodes is not None and self.maxNodes < self.minNodes:
            raise ValueError(f"maxNodes ({self.maxNodes}) must be at least minNodes ({self.minNodes})")
        return self


MAX_CONTEXT_LENGTH = 1 << 24


class Resources(Frozen):
    memoryHeadroom: Quantity = Field(default="512Mi", description="memory kept free on every node that holds a shard")
    contextLength: int | None = Field(
        default=None, ge=1, le=MAX_CONTEXT_LENGTH,
        description="tokens (prompt + completion) of KV cache reserved per request; default: the model's "
                    "context length, at most 4096")
    maxConcurrentRequests: int = Field(
        default=4, ge=1, le=1024, description="requests whose KV cache every stage reserves at once")
    maxBatchSize: int | None = Field(
        default=None, ge=1, le=1024,
        description="requests whose decode steps a stage runs as one batched forward; default: the node's "
                    "--max-batch-size (8)")

    @field_validator("memoryHeadroom")
    @classmethod
    def _headroom(cls, value: str | int) -> str | int:
        parse_quantity(value)
        return value

    @property
    def headroom_bytes(self) -> int:
        return parse_quantity(self.memoryHeadroom)


MAX_TENSOR_RANKS = 16


class Parallelism(Frozen):
    tensor: int = Field(default=1, ge=1, le=MAX_TENSOR_RANKS,
                        description="tensor-parallel ranks per pipeline stage, each on its own node (1: pipeline only)")


class Serving(Frozen):
    embeddings: bool = Field(default=False, description="serve /v1/embeddings: the mean of the prompt's last "
                                                        "hidden states after the model's final norm")


class ModelDeploymentSpec(Frozen):
    model: ModelSource
    replicas: int = Field(default=1, ge=0, le=64)
    placement: Placement = Field(default_factory=Placement)
    parallelism: Parallelism = Field(default_factory=Parallelism)
    resources: Resources = Field(default_factory=Resources)
    serving: Serving = Field(default_factory=Serving)


class ShardSummary(Frozen):
    replica: int
    index: int
    node: str
    layers: str
    phase: str


class ModelDeploymentStatus(Frozen):
    observedGeneration: int | None = None
    readyReplicas: int = 0
    shards: list[ShardSummary] = Field(default_factory=list)
    endpoint: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


class ModelDeployment(Frozen):
    KIND: ClassVar[str] = "ModelDeployment"
    apiVersion: Literal["exo.dev/v1alpha1"] = API_VERSION
    kind: Literal["ModelDeployment"] = "ModelDeployment"
    metadata: ObjectMeta
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None


# --- Node --------------------------------------------------------------------------------------

class NodeSpec(Frozen):
    nodeId: str
    address: str
    apiPort: int
    raftPort: int
    dataPort: int | None = None
    apiScheme: Literal["http", "https"] = Field(default="http", description="how the API port is served (exo --tls)")
    unschedulable: bool = Field(default=False, description="cordoned: no new shards; its shards move to other nodes "
                                "make-before-break (exoctl cordon/drain)")


class NodeCapacity(Frozen):
    memory: int = 0
    cpu: int = 0
    chip: str = ""
    dtypes: list[str] = Field(default_factory=list)


class NodeCompute(Frozen):
    """How this node computes, decided at start (source: measured, flag, accelerator or files): its
    fastest float dtype ("" = not decided; 16-bit float files are widened to float32 when it is
    float32, never narrowed) and the BLAS its process loaded."""
    dtype: Literal["", "bfloat16", "float32"] = ""
    blas: str = ""
    source: Literal["measured", "flag", "accelerator", "files"] = "files"
    matmulMs: dict[str, float] = Field(default_factory=dict, description="the start-up matmuls, per dtype")


class CachedModel(Frozen):
    """A model whose files this node holds: an original copy (a local path or the Hugging Face cache),
    or the parts of it its Shards fetched into the node's model cache."""
    name: str = Field(description="the model's ModelInfo name")
    source: str
    revision: str | None = None
    bytes: int = Field(default=0, ge=0, description="on this node's disk")
    complete: bool = Field(default=False, description="every file of the model, not only some layers")
    parts: list[str] = Field(default_factory=list, description="what a partial copy holds: layer ranges "
                             "(\"0-5\"), embedding, lm_head, head")
    lastUsed: str | None = Field(default=None, description="when a Shard last loaded from it (RFC 3339)")


class NodeStatus(Frozen):
    role: Literal["leader", "follower", "unknown"] = "unknown"
    capacity: NodeCapacity = Field(default_factory=NodeCapacity)
    allocatable: NodeCapacity = Field(default_factory=NodeCapacity)
    compute: NodeCompute = Field(default_factory=NodeCompute)
    cachedModels: list[CachedModel] = Field(default_factory=list)
    version: str = ""
    renewTime: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


class Node(Frozen):
    KIND: ClassVar[str] = "Node"
    apiVersion: Literal["exo.dev/v1alpha1"] = API_VERSION
    kind: Literal["Node"] = "Node"
    metadata: ObjectMeta
    spec: NodeSpec
    status: NodeStatus | None = None


# --- Shard -------------------------------------------------------------------------------------

class LayerRange(Frozen):
    start: int = Field(ge=0)
    end: int = Field(ge=1)

    @model_validator(mode="after")
    def _order(self) -> "LayerRange":
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        return self

    def __str__(self) -> str:
        return f"{self.start}-{self.end - 1}"


class TensorPeer(Frozen):
    node: str
    address: str = Field(description="HOST:PORT the rank's ring socket listens on")


class TensorGroup(Frozen):
    rank: int = Field(ge=0)
    size: int = Field(ge=2)
    peers: list[TensorPeer] = Field(description="every rank of the group, in rank order")
    computeDtype: str | None = Field(default=None, description=(
        "the dtype every rank loads float files in: the compute dtype all the group's nodes measured "
        "(Node status.compute.dtype), decided by the scheduler; unset where they differ (the files' dtype)"))

    @model_validator(mode="after")
    def _ranks(self) -> "TensorGroup":
        if self.rank >= self.size or len(self.peers) != self.size:
            raise ValueError(f"rank {self.rank} of {self.size} needs {self.size} peers, got {len(self.peers)}")
        return self


class ShardSpec(Frozen):
    deployment: str = Field(description="NAMESPACE/NAME of the owning ModelDeployment")
    deploymentUid: str | None = None
    generation: int | None = None
    replica: int = Field(ge=0)
    index: int = Field(ge=0)
    stages: int = Field(ge=1)
    layers: LayerRange
    totalLayers: int = Field(ge=1)
    nodeName: str
    model: ModelSource
    memoryBytes: int = Field(default=0, ge=0, description="weights the plan reserved for this stage")
    kvCacheBytes: int = Field(default=0, ge=0, description="KV cache reserved: context length × concurrent requests")
    overheadBytes: int = Field(default=0, ge=0, description="activations of a prefill chunk and the runtime baseline")
    maxRequests: int | None = Field(default=None, ge=1, description="requests whose KV cache this stage reserves; "
                                    "the stage refuses more at once")
    maxBatchSize: int | None = Field(default=None, ge=1, description="requests whose decode steps this stage runs "
                                     "as one forward; default: the node's --max-batch-size")
    tensor: TensorGroup | None = Field(default=None, description="this stage's tensor-parallel group, when it has one")

    @property
    def reserved_bytes(self) -> int:
        """Everything the plan holds on the node for this stage."""
        return self.memoryBytes + self.kvCacheBytes + self.overheadBytes


class ShardStatus(Frozen):
    phase: Literal["Pending", "Downloading", "Loading", "Ready", "Failed"] = "Pending"
    progress: float = 0.0
    bytesLoaded: int = 0
    bytesDownloaded: int = Field(default=0, ge=0, description="Downloading: bytes of this stage's weights fetched")
    bytesToDownload: int = Field(default=0, ge=0, description="Downloading: bytes this node lacked when it started")
    downloadRate: float = Field(default=0.0, ge=0, description="Downloading: bytes per second lately")
    message: str = ""
    dataEndpoint: str | None = None
    observedGeneration: int | None = None


class Shard(Frozen):
    KIND: ClassVar[str] = "Shard"
    apiVersion: Literal["exo.dev/v1alpha1"] = API_VERSION
    kind: Literal["Shard"] = "Shard"
    metadata: ObjectMeta
    spec: ShardSpec
    status: ShardStatus | None = None


# --- Kind registry -----------------------------------------------------------------------------

@dataclass(frozen=True)
class KindInfo:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    namespaced: bool
    model: type[Frozen]
    user_writable: bool

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/apis/{API_VERSION}"
        if self.namespaced:
            base += f"/namespaces/{namespace or DEFAULT_NAMESPACE}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base

    def ref(self, name: str) -> str:
        """kubectl's ``modeldeployment.exo.dev/NAME`` form."""
        return f"{self.singular}.exo.dev/{name}"


KINDS: dict[str, KindInfo] = {
    info.kind: info
    for info in (
        KindInfo("ModelDeployment", "modeldeployments", "modeldeployment", ("md", "mds"), True, ModelDeployment, True),
        KindInfo("Node", "nodes", "node", ("no",), False, Node, False),
        KindInfo("Shard", "shards", "shard", (), False, Shard, False),
    )
}


def kind_for(word: str) -> KindInfo | None:
    """Resolve what a user typed (``md``, ``shards``, ``ModelDeployment``, ``node.exo.dev``)."""
    word = word.lower().removesuffix(".exo.dev")
    for info in KINDS.values():
        if word in (info.kind.lower(), info.plural, info.singular, *info.short_names):
            return info
    return None


def object_key(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    info = KINDS[obj["kind"]]
    return (obj["kind"], (meta.get("namespace") or DEFAULT_NAMESPACE) if info.namespaced else "", meta["name"])
