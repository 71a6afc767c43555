"""Apply-time refusal of tensor-parallel ModelDeployments whose model mlx-lm cannot shard.

A create/replace/apply of a ModelDeployment with ``spec.parallelism.tensor`` > 1 is refused (422,
naming ``spec.parallelism.tensor`` and the family) when this node can read the model's config (its
ModelInfo in the replicated state, else a local path, the local Hugging Face cache, or the catalog)
and the family has no ``shard()`` in
mlx-lm or its head counts do not divide by the ranks. The check is the scheduler's own
(``tensor_refusal_of``); a model whose config this node cannot read is left to the scheduler.
"""
from __future__ import annotations

import asyncio
from typing import Any

from exo_ctl.api.validation import Cause, InvalidObject
from reconciler.models.metadata import ModelMetadataError
from reconciler.controllers.model_info import stored_model_info
from reconciler.runtime.tensor_group import TENSOR_FIELD, tensor_refusal, tensor_refusal_of
from reconciler.store.base import Store

WRITE_OPS = ("create", "replace", "apply")


def tensor_admission(obj: dict[str, Any], *, config: dict[str, Any] | None = None) -> None:
    """Raise InvalidObject when ``obj`` (a normalized object of any kind) is a ModelDeployment
    asking for tensor ranks its model cannot be sharded over; ``config``: the model's, from its
    ModelInfo, when recorded. Blocking: imports mlx-lm."""
    if obj.get("kind") != "ModelDeployment":
        return
    spec = obj.get("spec") or {}
    ranks = (spec.get("parallelism") or {}).get("tensor", 1)
    if ranks <= 1:
        return
    model = spec["model"]
    try:
        refusal = (tensor_refusal(config, ranks=ranks) if config is not None
                   else tensor_refusal_of(model["source"], revision=model.get("revision"), ranks=ranks))
    except (ModelMetadataError, OSError):  # an unreadable config: the scheduler's condition says why
        return
    if refusal:
        name = obj["metadata"].get("name")
        raise InvalidObject(f'ModelDeployment "{name}" is invalid',
                            [Cause(TENSOR_FIELD, refusal.removeprefix(f"{TENSOR_FIELD}: "), "FieldValueNotSupported")],
                            kind="ModelDeployment", name=name)


async def admit_write(command: dict[str, Any], *, store: Store | None = None) -> None:
    """``tensor_admission`` for the object a store command writes, off the event loop, with the
    config of the model's ModelInfo in ``store`` when one is recorded."""
    obj = command.get("object")
    if command.get("op") in WRITE_OPS and obj and obj.get("kind", command.get("kind")) == "ModelDeployment" \
            and ((obj.get("spec") or {}).get("parallelism") or {}).get("tensor", 1) > 1:
        model = (obj.get("spec") or {}).get("model") or {}
        recorded = (stored_model_info(store, model["source"], model.get("revision"))
                    if store is not None and isinstance(model.get("source"), str) else None)
        await asyncio.to_thread(tensor_admission, {"kind": "ModelDeployment", **obj},
                                config=recorded[0].config if recorded is not None else None)
