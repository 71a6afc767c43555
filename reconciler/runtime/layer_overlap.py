"""Overlap building a stage's graph with computing it, layer by layer.

mlx-lm's ``generate_step`` hides the Python cost of building a step's graph (~1 ms per layer of
the tiny model on this CPU) behind the previous step's compute with ``mx.async_eval``. A pipeline
stage cannot: the next step's input arrives over the network. So each of the stage's layers
starts evaluating its output as soon as its graph is built, and the compute thread builds the
next layer's graph while MLX computes the previous one. Results are unchanged (same graph, same
order of evaluation); only when evaluation starts differs.
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn


@cache
def _overlapping(cls: type) -> type:
    """``cls`` with a ``__call__`` that starts evaluating its output before returning it."""

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = cls.__call__(self, *args, **kwargs)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        mx.async_eval(*(o for o in outputs if isinstance(o, mx.array)))
        return out

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "overlaps_compute": True})


def overlap_layers(layers: Iterable[nn.Module]) -> None:
    """Make each layer start its own evaluation (in place: same object, weights and attributes)."""
    for layer in layers:
        if not getattr(type(layer), "overlaps_compute", False):
            layer.__class__ = _overlapping(type(layer))
