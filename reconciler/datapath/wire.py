"""Data-path framing: a fixed binary header, optional JSON metadata, then raw tensor bytes.

Frame layout (network byte order): magic "XS", version, kind, stage, flags, request id (u64),
position (u32), token (i32), dtype, ndim, shape (4 x u32), metadata length (u32), data length
(u64); then the metadata (UTF-8 JSON, control frames only) and the tensor's raw bytes. Encoding
and decoding here never touch MLX; `array_to_tensor`/`tensor_to_array` do, on a compute thread.
"""

from __future__ import annotations

import asyncio
import enum
import json
import ssl
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import mlx.core as mx

MAGIC = b"XS"
VERSION = 1
HEADER = struct.Struct("!2sBBBBQIiBBxx4IIQ")
MAX_NDIM = 4
MAX_META_BYTES = 1 << 20
# The largest tensor a frame may claim: a 512-row chunk of 16,384-wide float32 hidden states.
# A peer's header is checked against it before any of the body is read.
MAX_DATA_BYTES = 32 << 20
MAX_HELLO_META_BYTES = 1024
NO_TOKEN = -1

FLAG_SAMPLE = 1  # the last stage samples a token from this chunk's final position


class Kind(enum.IntEnum):
    OPEN = 1  # origin -> every stage: meta = OpenRequest
    OPENED = 2  # stage -> origin: the request is set up on that stage
    FORWARD = 3  # origin -> stage 0 (token ids), stage i -> stage i+1 (hidden states)
    TOKEN = 4  # last stage -> origin: `token` holds the sampled id
    END = 5  # origin -> every stage: free the request (done or cancelled)
    ERROR = 6  # stage -> origin: meta = ErrorReport; the request is dropped on that stage
    PING = 7
    PONG = 8
    HELLO = 9  # first frame on every connection when the server requires a token: meta = {"token"}
    ACK = 10  # last stage -> origin: a prefill chunk went through every stage (flow control)
    VECTOR = 11  # last stage -> origin, for an embedding request: the mean of its normed hidden states
    WEIGHTS_GET = 12  # node -> peer: meta = {"model", "tensor", "offset", "length"}: a range of a tensor's bytes
    WEIGHTS_DATA = 13  # peer -> node, same request id: the bytes as a uint8 tensor
    WEIGHTS_REFUSED = 14  # peer -> node, same request id: meta = {"message", "missing"} (missing: not held here)


# Wire dtype codes; numpy has no bfloat16, so bf16 travels as its raw 16-bit pattern.
DTYPES: dict[str, tuple[int, int]] = {  # name -> (code, item size)
    "bfloat16": (1, 2),
    "float16": (2, 2),
    "float32": (3, 4),
    "int32": (4, 4),
    "uint32": (5, 4),
    "uint8": (6, 1),  # raw bytes (weight ranges)
}
DTYPE_NAMES = {code: name for name, (code, _) in DTYPES.items()}


class WireError(ValueError):
    """A frame that does not follow the protocol."""


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (cleanly or mid-frame)."""


class StageAddress(BaseModel):
    """Where one pipeline stage runs: a stage server's host:port and the shard name it hosts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    port: int = Field(ge=1, le=65535)
    shard: str = Field(min_length=1)

    def __str__(self) -> str:
        return f"{self.shard}@{self.host}:{self.port}"


SEED_RANGE = 1 << 63  # seeds travel as 0 <= seed < 2**63 (mx.random.key takes them)
PENALTY_WINDOW = 20  # tokens the penalties look back over (mlx-lm's default context size)
MAX_LOGIT_BIAS = 300  # logit_bias entries per request
MAX_TOP_LOGPROBS = 20  # alternatives a TOKEN frame may carry with its log-probability
MAX_GRAMMAR_CHARS = 256 << 10  # a compiled grammar in OPEN (well within MAX_META_BYTES)
_PENALTY_NOTE = f"mlx-lm's penalty over the last {PENALTY_WINDOW} tokens, the prompt's included"


class SamplingParams(BaseModel):
    """How tokens are drawn: the one set of sampling rules, shared by the OpenAI API (its
    ValidationError is the client's 400), the inference backends and the wire (OPEN frames).

    ``top_p`` 0 means greedy (the limit of a nucleus whose mass goes to 0), so it is stored as
    temperature 0, top_p 1. Any 64-bit seed is accepted (OpenAI clients send negative ones) and
    mapped deterministically into the wire's range; None lets the pipeline draw one."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    top_k: int = Field(default=0, ge=0, lt=1 << 31)  # 0: off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # 0: off
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description=_PENALTY_NOTE)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description=_PENALTY_NOTE)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, description=_PENALTY_NOTE)
    logit_bias: dict[str, float] = Field(default={}, max_length=MAX_LOGIT_BIAS, json_schema_extra={
        "propertyNames": {"pattern": "^[0-9]{1,9}$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})  # token id -> bias
    prompt_tail: list[int] = Field(default=[], max_length=PENALTY_WINDOW)  # what penalties see of the prompt
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # None: off; else how many alternatives
    grammar: str | None = Field(default=None, max_length=MAX_GRAMMAR_CHARS)  # llguidance's, for constrained decoding

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _bias_is_token_ids(cls, bias: dict[str, float]) -> dict[str, float]:
        for token, value in bias.items():
            if not (token.isascii() and token.isdigit() and len(token) < 10):
                raise ValueError(f"keys must be token ids (integers >= 0), got {token!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"values must be numbers from -100 to 100, got {value} for token {token}")
        return bias

    @field_validator("seed", mode="after")
    @classmethod
    def _seed_in_wire_range(cls, seed: int | None) -> int | None:
        return None if seed is None else seed % SEED_RANGE

    @model_validator(mode="after")
    def _top_p_zero_is_greedy(self) -> "SamplingParams":
        if self.top_p == 0.0:
            object.__setattr__(self, "temperature", 0.0)
            object.__setattr__(self, "top_p", 1.0)
        return self


class OpenRequest(BaseModel):
    """Sets up one request on one stage: which shard runs it and where its output goes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shard: str
    next: StageAddress | None = None  # None: this is the last stage; it samples
    sampling: SamplingParams = SamplingParams()
    embed: bool = False  # the last stage pools the prompt's normed hidden states instead of sampling


class ErrorReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str
    message: str
    next_stage_lost: bool = False  # the stage lost its connection to the next one
    busy: bool = False  # the shard already runs as many requests as it reserved KV cache for


@dataclass(frozen=True)
class Tensor:
    """A tensor as it travels: dtype name, shape and C-contiguous raw bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise WireError(f"tensor dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if len(self.shape) > MAX_NDIM:
            raise WireError(f"tensor has {len(self.shape)} dimensions, at most {MAX_NDIM} travel")
        expected = DTYPES[self.dtype][1]
        for dim in self.shape:
            expected *= dim
        if expected != len(self.data):
            raise WireError(f"tensor {self.dtype}{list(self.shape)} needs {expected} bytes, got {len(self.data)}")


@dataclass(frozen=True)
class Frame:
    kind: Kind
    request_id: int
    stage: int = 0  # index in the route of the stage this frame is for (or from)
    flags: int = 0
    position: int = 0  # FORWARD: sequence position of the chunk's first row
    token: int = NO_TOKEN  # TOKEN: the sampled token id
    meta: dict[str, Any] | None = None
    tensor: Tensor | None = None


def encode_frame(frame: Frame) -> tuple[bytes, bytes | memoryview]:
    """Header + metadata, and the tensor bytes (kept apart so they are never copied here)."""
    meta = json.dumps(frame.meta, separators=(",", ":")).encode() if frame.meta is not None else b""
    if len(meta) > MAX_META_BYTES:
        raise WireError(f"frame metadata is {len(meta)} bytes, at most {MAX_META_BYTES}")
    tensor = frame.tensor
    if tensor is None:
        dtype, shape, data = 0, (), b""
    else:
        dtype, shape, data = DTYPES[tensor.dtype][0], tensor.shape, tensor.data
    header = HEADER.pack(
        MAGIC, VERSION, int(frame.kind), frame.stage, frame.flags, frame.request_id,
        frame.position, frame.token, dtype, len(shape), *shape, *([0] * (MAX_NDIM - len(shape))),
        len(meta), len(data),
    )  # fmt: skip
    return header + meta, data


@dataclass(frozen=True)
class Header:
    kind: Kind
    request_id: int
    stage: int
    flags: int
    position: int
    token: int
    dtype: int
    shape: tuple[int, ...]
    meta_len: int
    data_len: int


def decode_header(raw: bytes) -> Header:
    if len(raw) != HEADER.size:
        raise WireError(f"header is {len(raw)} bytes, expected {HEADER.size}")
    (magic, version, kind, stage, flags, request_id, position, token, dtype, ndim,
     s0, s1, s2, s3, meta_len, data_len) = HEADER.unpack(raw)  # fmt: skip
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: not an exoctl data-path peer")
    if version != VERSION:
        raise WireError(f"protocol version {version}, this node speaks {VERSION}")
    try:
        kind = Kind(kind)
    except ValueError:
        raise WireError(f"unknown frame kind {kind}") from None
    if ndim > MAX_NDIM:
        raise WireError(f"tensor has {ndim} dimensions, at most {MAX_NDIM}")
    if dtype and dtype not in DTYPE_NAMES:
        raise WireError(f"unknown dtype code {dtype}")
    if meta_len > MAX_META_BYTES or data_len > MAX_DATA_BYTES:
        raise WireError(f"frame too large: {meta_len} metadata bytes (at most {MAX_META_BYTES}), "
                        f"{data_len} data bytes (at most {MAX_DATA_BYTES})")
    return Header(kind, request_id, stage, flags, position, token, dtype, (s0, s1, s2, s3)[:ndim], meta_len, data_len)


def decode_body(header: Header, meta: bytes, data: bytes) -> Frame:
    try:
        meta_obj = json.loads(meta) if meta else None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise WireError(f"frame metadata is not JSON: {exc}") from None
    tensor = Tensor(DTYPE_NAMES[header.dtype], header.shape, data) if header.dtype else None
    if tensor is None and data:
        raise WireError(f"frame carries {len(data)} data bytes but no dtype")
    return Frame(
        kind=header.kind, request_id=header.request_id, stage=header.stage, flags=header.flags,
        position=header.position, token=header.token, meta=meta_obj, tensor=tensor,
    )  # fmt: skip


def decode_frame(raw: bytes) -> Frame:
    """Decode one whole frame held in memory (the inverse of `encode_frame`)."""
    header = decode_header(raw[: HEADER.size])
    body = raw[HEADER.size :]
    if len(body) != header.meta_len + header.data_len:
        raise WireError(f"frame body is {len(body)} bytes, header says {header.meta_len + header.data_len}")
    return decode_body(header, body[: header.meta_len], body[header.meta_len :])


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    try:
        header = decode_header(await reader.readexactly(HEADER.size))
        meta = await reader.readexactly(header.meta_len) if header.meta_len else b""
        data = await reader.readexactly(header.data_len) if header.data_len else b""
    except asyncio.IncompleteReadError:
        raise ConnectionClosed("peer closed the connection") from None
    except ConnectionResetError as exc:
        raise ConnectionClosed(f"connection reset: {exc}") from None
    return decode_body(header, meta, data)


def write_frame(writer: asyncio.StreamWriter, frame: Frame) -> int:
    """Queue a frame on the transport (no await: frames from one caller keep their order);
    returns its size in bytes."""
    head, data = encode_frame(frame)
    writer.write(head)
    if data:
        writer.write(data)
    return len(head) + len(data)


def frame_size(frame: Frame) -> int:
    """Bytes `frame` takes on the wire (metadata-free frames: no encoding needed)."""
    if frame.meta is not None:
        head, data = encode_frame(frame)
        return len(head) + len(data)
    return HEADER.size + (len(frame.tensor.data) if frame.tensor is not None else 0)


@dataclass(frozen=True)
class DataPathTLS:
    """TLS for stage connections (they carry prompts' hidden states): a stage server given one
    accepts TLS only; a client uses it towards every non-loopback address (and, with
    ``loopback``, towards loopback too: benchmarks and tests). Certificates come from the
    cluster CA (reconciler.tls); any member's certificate is accepted, the HELLO token still
    proves the peer holds the cluster's data-path key."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    loopback: bool = False

    def client_for(self, host: str) -> ssl.SSLContext | None:
        from reconciler.tls import is_loopback

        return self.client if self.loopback or not is_loopback(host) else None


async def open_connection(host: str, port: int, *, timeout_s: float,
                          tls: DataPathTLS | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection with Nagle's algorithm off (frames are small and latency-bound), over
    TLS when ``tls`` says so for ``host``."""
    context = tls.client_for(host) if tls is not None else None
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, ssl_handshake_timeout=timeout_s if context else None),
        timeout_s)
    set_nodelay(writer)
    return reader, writer


def hello_frame(token: str) -> Frame:
    return Frame(Kind.HELLO, 0, meta={"token": token})


async def check_hello(reader: asyncio.StreamReader, *, token: str, timeout_s: float) -> None:
    """The first frame of a connection must be a HELLO with ``token``; anything else is refused
    before any other frame is read (a small header is all an unauthenticated peer gets to send)."""
    import hmac

    try:
        header = decode_header(await asyncio.wait_for(reader.readexactly(HEADER.size), timeout_s))
        if header.kind is not Kind.HELLO or header.data_len or header.meta_len > MAX_HELLO_META_BYTES:
            raise WireError("the first frame must be HELLO with the cluster's data-path token")
        meta = await asyncio.wait_for(reader.readexactly(header.meta_len), timeout_s)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError):
        raise WireError("no HELLO from the peer") from None
    frame = decode_body(header, meta, b"")
    offered = str(frame.meta.get("token", "")) if isinstance(frame.meta, dict) else ""
    if not hmac.compare_digest(offered.encode(), token.encode()):
        raise WireError("wrong data-path token (is the peer from another cluster?)")


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    import socket

    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def array_to_tensor(array: mx.array) -> Tensor:
    """Raw bytes of an MLX array (evaluates it); call on the array's compute thread."""
    import mlx.core as mx

    name = str(array.dtype).removeprefix("mlx.core.")
    array = mx.contiguous(array)
    mx.eval(array)
    return Tensor(name, tuple(array.shape), memoryview(array).cast("B"))


def tensor_to_array(tensor: Tensor) -> mx.array:
    """An MLX array from wire bytes; call on the compute thread that will use it."""
    import mlx.core as mx
    import numpy as np

    if tensor.dtype == "bfloat16":
        flat = mx.array(np.frombuffer(tensor.data, dtype=np.uint16)).view(mx.bfloat16)
    else:
        flat = mx.array(np.frombuffer(tensor.data, dtype=np.dtype(tensor.dtype)))
    return flat.reshape(tensor.shape)
