"""In-memory twin of the Raft store, for unit tests of everything above the store."""
from __future__ import annotations

from typing import Any

from reconciler.store.base import Store, StoreUnavailable
from reconciler.store.state import apply


class MemoryStore(Store):
    def __init__(self, *, leader: bool = True, quorum: bool = True) -> None:
        super().__init__()
        self.leader = leader
        self.quorum = quorum
        self.commands: list[dict[str, Any]] = []

    async def _commit(self, command: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        if not self.quorum:
            raise StoreUnavailable("no quorum")
        self.commands.append(command)
        state, result = apply(self._state, command)
        self._publish(state)
        return result

    @property
    def is_leader(self) -> bool:
        return self.leader

    @property
    def has_quorum(self) -> bool:
        return self.quorum
