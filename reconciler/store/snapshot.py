"""The replicated state in a Raft snapshot: versioned JSON, like the commands.

PySyncObj still pickles its dump, but what our state machine hands it is one JSON string with a
``version``, so renaming a dataclass or a field never breaks loading an old dump. Dumps written
before version 1 held ``{"state": StoreState, "directory": dict}`` pickled by class path; they
still load.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from reconciler.store.state import Event, StoreState

SNAPSHOT_VERSION = 1

Directory = dict[str, dict[str, str]]


def state_to_snapshot(state: StoreState, directory: Mapping[str, Mapping[str, str]]) -> str:
    return json.dumps({
        "version": SNAPSHOT_VERSION,
        "revision": state.revision,
        "objects": [[*key, obj] for key, obj in state.objects.items()],
        "history": [{"type": e.type, "revision": e.revision, "object": e.object} for e in state.history],
        "leaseHistory": [{"type": e.type, "revision": e.revision, "object": e.object} for e in state.lease_history],
        "opResults": dict(state.op_results),
        "opOrder": list(state.op_order),
        "directory": {k: dict(v) for k, v in directory.items()},
    }, separators=(",", ":"))


def state_from_snapshot(data: str | Mapping[str, Any]) -> tuple[StoreState, Directory]:
    """Read a snapshot written by ``state_to_snapshot`` or by the pickled format before it."""
    if isinstance(data, Mapping) and isinstance(data.get("state"), StoreState):
        return data["state"], {k: dict(v) for k, v in data.get("directory", {}).items()}
    if not isinstance(data, str):
        raise ValueError(f"raft snapshot: unknown format ({type(data).__name__})")
    doc = json.loads(data)
    if doc.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"raft snapshot: version {doc.get('version')!r} is not supported "
                         f"(this node reads version {SNAPSHOT_VERSION}); upgrade the node")
    state = StoreState(
        revision=doc["revision"],
        objects={(kind, namespace, name): obj for kind, namespace, name, obj in doc["objects"]},
        history=_events(doc["history"]),
        lease_history=_events(doc["leaseHistory"]),
        op_results=doc["opResults"],
        op_order=tuple(doc["opOrder"]),
    )
    return state, {k: dict(v) for k, v in doc["directory"].items()}


def _events(raw: list[dict[str, Any]]) -> tuple[Event, ...]:
    return tuple(Event(type=e["type"], revision=e["revision"], object=e["object"]) for e in raw)
