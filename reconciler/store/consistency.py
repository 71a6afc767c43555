"""Replica agreement, checked: like etcd's corruption check, replicas compare a digest of their
state at the same revision, and one that disagrees with the majority is diverged.

Every replica records its state at each revision that is a multiple of ``CHECKPOINT_EVERY``
(objects change only with the revision, so every correct replica holds the same objects at the
same revision); the digest is computed when asked, never on the Raft thread. ``judge`` is pure:
given this node's checkpoints and its peers', it finds the newest revision a majority of the
members recorded and says whether this node agrees with the majority there.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from reconciler.store.state import StoreState

CHECKPOINT_EVERY = 16   # revisions between two checkpoints (3 nodes renew leases ~3 revisions/s)
CHECKPOINTS_KEPT = 8


def state_digest(state: StoreState) -> str:
    """sha256 of the revision and every object (canonical JSON, ordered by key)."""
    digest = hashlib.sha256(str(state.revision).encode())
    for key in sorted(state.objects):
        digest.update(json.dumps([*key, state.objects[key]], sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


class Checkpoints:
    """The states of the last ``CHECKPOINTS_KEPT`` checkpoint revisions and their digests.
    ``record`` runs on the Raft thread (a reference, no hashing); ``digests`` on the loop."""

    def __init__(self, *, every: int = CHECKPOINT_EVERY, kept: int = CHECKPOINTS_KEPT) -> None:
        self.every, self.kept = every, kept
        self._states: dict[int, StoreState] = {}
        self._digests: dict[int, str] = {}

    def record(self, state: StoreState) -> None:
        if state.revision % self.every:
            return
        states = dict(self._states)  # swapped whole: the loop thread may be reading the old one
        states[state.revision] = state
        for old in sorted(states)[:-self.kept]:
            del states[old]
        self._states = states

    def digests(self) -> dict[int, str]:
        states = self._states
        digests = {rev: self._digests.get(rev) or state_digest(state) for rev, state in states.items()}
        self._digests = digests
        return dict(digests)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one comparison. ``agrees`` is None when there was nothing to compare
    (no revision recorded by a majority yet, or no majority digest there)."""
    revision: int | None
    agrees: bool | None
    diverged_peers: tuple[str, ...] = ()
    agreeing_peers: tuple[str, ...] = ()
    message: str = ""


def judge(own: Mapping[int, str], peers: Mapping[str, Mapping[int, str]], *, members: int) -> Verdict:
    """Compare at the newest revision of ``own`` that a majority of ``members`` recorded."""
    majority = members // 2 + 1
    undecided: Verdict | None = None
    for revision in sorted(own, reverse=True):
        digests = {"self": own[revision], **{p: d[revision] for p, d in peers.items() if revision in d}}
        if len(digests) < majority:
            continue
        counts: dict[str, int] = {}
        for digest in digests.values():
            counts[digest] = counts.get(digest, 0) + 1
        winner = max(counts, key=lambda d: counts[d])
        if counts[winner] < majority:
            undecided = undecided or Verdict(revision, None, message=f"no digest is shared by a majority at "
                                                                      f"revision {revision}")
            continue  # an older revision that more peers agree on may still decide
        others = tuple(sorted(p for p, d in digests.items() if d != winner and p != "self"))
        agreeing = tuple(sorted(p for p, d in digests.items() if d == winner and p != "self"))
        if own[revision] != winner:
            return Verdict(revision, False, others, agreeing, message=(
                f"this replica's state at revision {revision} (digest {own[revision][:12]}) differs from the "
                f"majority's ({winner[:12]}, {counts[winner]} of {members} members)"))
        return Verdict(revision, True, others, agreeing, message=f"agrees with {counts[winner] - 1} peer(s) at revision {revision}")
    return undecided or Verdict(None, None, message="no checkpoint recorded by a majority yet")
