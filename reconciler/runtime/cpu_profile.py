"""Which float dtype this node computes fastest in, decided by a short measurement at start.

MLX's Linux wheel runs bf16 matmuls in plain loops and fp32 through whatever BLAS the process
loaded (its bundled reference BLAS, or OpenBLAS when preloaded: see reconciler.runtime.blas), so
on CPU nodes fp32 can decode faster than bf16 despite twice the bytes; on GPUs bf16 stays.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exo_ctl.api.resources import NodeCompute

CANDIDATES = ("bfloat16", "float32")
# (batch, in, out): one decode step of a ~1024-wide model, alone and batched.
SHAPES = ((1, 1024, 1024), (8, 1024, 1024))
REPEATS = 4
BUDGET_S = 1.0
# Another dtype replaces the files' 16-bit one only when clearly faster: it costs more memory.
MIN_SPEEDUP = 1.1
DTYPE_CHOICES = ("auto", "files", "float32")

Clock = Callable[[], float]


def choose_dtype(timings: dict[str, float], *, baseline: str = "bfloat16") -> str:
    """The fastest dtype of ``timings`` (seconds), unless it beats ``baseline`` by less than MIN_SPEEDUP."""
    if not timings:
        raise ValueError("choose_dtype: no timings")
    fastest = min(timings, key=lambda name: (timings[name], name != baseline))
    if baseline in timings and timings[fastest] * MIN_SPEEDUP > timings[baseline]:
        return baseline
    return fastest


def time_matmuls(*, dtypes: tuple[str, ...] = CANDIDATES, clock: Clock = time.perf_counter,
                 budget_s: float = BUDGET_S) -> dict[str, float]:
    """Best-of-REPEATS seconds per dtype for the SHAPES matmuls, interleaved so load hits all alike;
    stops early (fewer repeats, at least one) once ``budget_s`` is spent, set-up included."""
    import mlx.core as mx

    deadline = clock() + budget_s
    operands = {}
    for name in dtypes:
        dtype = getattr(mx, name)
        pairs = [(mx.random.normal((b, n)).astype(dtype), mx.random.normal((m, n)).astype(dtype)) for b, n, m in SHAPES]
        mx.eval(pairs)
        for x, w in pairs:  # warm up: first calls allocate
            mx.eval(x @ w.T)
        operands[name] = pairs
    best = {name: float("inf") for name in dtypes}
    for _ in range(REPEATS):
        for name, pairs in operands.items():
            began = clock()
            for x, w in pairs:
                mx.eval(x @ w.T)
            best[name] = min(best[name], clock() - began)
        if clock() > deadline:
            break
    return best


def has_accelerator() -> bool:
    import mlx.core as mx

    return bool(mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()))


def loaded_blas(maps: str | None = None) -> str:
    """The BLAS library mapped into this process: openblas, blis, mkl, accelerate, or reference
    (the reference BLAS MLX's Linux wheel bundles); "" when none is mapped."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "accelerate" if Path("/System/Library/Frameworks/Accelerate.framework").exists() else ""
    names = {Path(line.split()[-1]).name.lower() for line in maps.splitlines() if "/" in line}
    for library, marker in (("openblas", "libopenblas"), ("blis", "libblis"), ("mkl", "libmkl")):
        if any(name.startswith(marker) for name in names):
            return library
    return "reference" if any(name.startswith("libblas") for name in names) else ""


def compute_profile(option: str = "auto", *, clock: Clock = time.perf_counter) -> NodeCompute:
    """The profile for ``--compute-dtype option``: measured for auto on a node without a GPU."""
    if option not in DTYPE_CHOICES:
        raise ValueError(f"--compute-dtype: must be one of {', '.join(DTYPE_CHOICES)}, got {option!r}")
    blas = loaded_blas()
    if option == "files":
        return NodeCompute(blas=blas, source="files")
    if option != "auto":
        return NodeCompute(dtype=option, blas=blas, source="flag")
    if has_accelerator():
        return NodeCompute(blas=blas, source="accelerator")
    timings = time_matmuls(clock=clock)
    return NodeCompute(dtype=choose_dtype(timings), blas=blas, source="measured",
                       matmulMs={name: round(seconds * 1000, 3) for name, seconds in timings.items()})


def loader_in(compute_dtype: str, loader: Callable[..., Any]) -> Callable[..., Any]:
    """``loader`` (the shard agent's) loading in the dtype ``serving_dtype`` picks for this node's
    ``compute_dtype`` (16-bit float files widened to float32 where that is faster)."""
    if not compute_dtype:
        return loader
    from reconciler.models.metadata import read_config
    from reconciler.runtime.weight_dtype import serving_dtype

    async def load(path: Path, *, dtype: str | None = None, **kwargs: Any) -> Any:
        chosen = serving_dtype(dtype, compute_dtype=compute_dtype, config=read_config(Path(path)))
        return await loader(path, dtype=chosen, **kwargs)

    return load


def tensor_loader_in(loader: Callable[..., Any]) -> Callable[..., Any]:
    """``loader_in`` for tensor ranks. The ranks of a group must hold one dtype (their all-sums add
    arrays element by element), so a rank does not follow its own node's measurement: it loads in
    the dtype the scheduler wrote for the whole group (``group.computeDtype``, set only where every
    rank's node measured the same one), or in the files' dtype where that is unset."""

    async def load(path: Path, *, group: Any, **kwargs: Any) -> Any:
        return await loader_in(group.computeDtype or "", loader)(path, group=group, **kwargs)

    return load
