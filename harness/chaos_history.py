"""A history checker for the control plane under faults: pure code, no I/O.

Input: every operation the clients made (who, when, what, outcome, what it returned) and the
objects each node serves at the end. Each write stores a value no other write uses, so a value
seen anywhere names the one write that made it. Output: the violations found, and counts.

What an outcome means (as Jepsen and etcd's robustness tests reason): ``ok`` took effect exactly
once, at the resourceVersion it returned; ``failed`` never took effect; ``unknown`` (a timeout,
a 503/504, a dropped connection, never resolved by retrying with the same op id) may take effect
once, at any time after it started — even after the client gave up — or never.

Facts are derived per object: "at revision x the object held state s" (a value, or ABSENT),
from acknowledged writes (at their resourceVersion), reads (at the object's resourceVersion),
lists and the final state (at the list's revision too). The checks:
- replicas-differ: every node ends with the same objects, resourceVersions and values;
- lost: an acknowledged write is not in the final state and no later acknowledged (or any
  unknown) write to the same object superseded it;
- failed-visible / unknown-origin: a value of a failed write, or one nobody wrote, was seen;
- unknown-partial: an unknown write's value is on some nodes at the end but not all;
- too-early: a value seen at a revision before its write committed (an acknowledged write's
  resourceVersion, or for an unknown write any revision acknowledged before it started);
- conflict / reappeared / unexplained: two states at one revision; a value back after another
  state replaced it; a change between two facts that no write can have made;
- revision-order: an acknowledged write that finished before another started has the smaller
  resourceVersion (revisions grow in real time, so per object too);
- stale-read: a client reads an object at an older resourceVersion than it already saw or
  wrote, or lists at a revision older than one it already saw or wrote.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["apply", "update", "delete", "get", "list"]
Outcome = Literal["ok", "failed", "unknown"]
WRITES = ("apply", "update", "delete")
ABSENT = None  # the state of an object that does not exist


@dataclass(frozen=True)
class Observed:
    """One object as a read returned it: its resourceVersion and the value it carries (None
    when it carries none)."""
    rv: int
    value: str | None


@dataclass(frozen=True)
class Op:
    client: str
    kind: Kind
    key: str | None           # the object's name (None for a list)
    start: float
    end: float
    outcome: Outcome
    value: str | None = None  # what an apply/update wrote
    rv: int | None = None     # an ok write: the resourceVersion it returned; an ok list: its revision
    read: Observed | None = None                  # an ok get: what it returned (None: 404)
    listed: Mapping[str, Observed] | None = None  # an ok list: every object it returned


@dataclass(frozen=True)
class NodeState:
    """What one node serves at the end: its revision and every object of the checked kind."""
    revision: int
    objects: Mapping[str, Observed]


@dataclass(frozen=True)
class Violation:
    check: str
    key: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.check} [{self.key}]: {self.message}" if self.key else f"{self.check}: {self.message}"


@dataclass(frozen=True)
class Report:
    violations: tuple[Violation, ...]
    counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def of(self, check: str) -> list[Violation]:
        return [v for v in self.violations if v.check == check]

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        lines = [f"{len(self.violations)} violations ({counts})"]
        return "\n".join(lines + [f"  {v}" for v in self.violations[:50]])


@dataclass(frozen=True)
class _Fact:
    revision: int
    state: str | None
    source: str


def _describe(op: Op) -> str:
    return f"{op.client} {op.kind} {op.key or ''} {op.outcome}@{op.start:.3f}-{op.end:.3f}".replace("  ", " ")


class _History:
    def __init__(self, ops: Sequence[Op]) -> None:
        self.ops = sorted(ops, key=lambda o: (o.start, o.end))
        self.writes = [o for o in self.ops if o.kind in WRITES]
        self.writer: dict[str, Op] = {}
        for op in self.writes:
            if op.kind != "delete":
                if op.value is None:
                    raise ValueError(f"{_describe(op)}: an apply/update must carry a value")
                if op.value in self.writer:
                    raise ValueError(f"value {op.value!r} written twice: each write needs a value of its own")
                self.writer[op.value] = op
            if op.outcome == "ok" and op.rv is None:
                raise ValueError(f"{_describe(op)}: an ok write must carry the resourceVersion it returned")
        self.keys = sorted({o.key for o in self.ops if o.key is not None}
                           | {k for o in self.ops for k in (o.listed or {})})
        self.floor = self._floors()

    def _floors(self) -> dict[int, int]:
        """For each write (by id): the highest resourceVersion acknowledged before it started."""
        acked = sorted((o for o in self.writes if o.outcome == "ok"), key=lambda o: o.end)
        out, best, i = {}, 0, 0
        for op in sorted(self.writes, key=lambda o: o.start):
            while i < len(acked) and acked[i].end < op.start:
                best = max(best, acked[i].rv)
                i += 1
            out[id(op)] = best
        return out


def _facts(history: _History, final: Mapping[str, NodeState]) -> dict[str, list[_Fact]]:
    facts: dict[str, list[_Fact]] = defaultdict(list)
    keys = sorted(set(history.keys) | {k for state in final.values() for k in state.objects})
    for op in history.ops:
        if op.outcome != "ok":
            continue
        if op.kind in ("apply", "update"):
            facts[op.key].append(_Fact(op.rv, op.value, _describe(op)))
        elif op.kind == "delete":
            facts[op.key].append(_Fact(op.rv, ABSENT, _describe(op)))
        elif op.kind == "get" and op.read is not None:
            facts[op.key].append(_Fact(op.read.rv, op.read.value, _describe(op)))
        elif op.kind == "list" and op.listed is not None:
            _listing(facts, keys, op.rv, op.listed, _describe(op))
    for node, state in final.items():
        _listing(facts, keys, state.revision, state.objects, f"final state of {node}")
    return facts


def _listing(facts: dict[str, list[_Fact]], keys: Iterable[str], revision: int | None,
             objects: Mapping[str, Observed], source: str) -> None:
    for key in keys:
        seen = objects.get(key)
        if seen is None:
            if revision is not None:
                facts[key].append(_Fact(revision, ABSENT, source))
            continue
        facts[key].append(_Fact(seen.rv, seen.value, source))
        if revision is not None and revision > seen.rv:
            facts[key].append(_Fact(revision, seen.value, source))


def _check_origins(history: _History, facts: Mapping[str, list[_Fact]]) -> Iterable[Violation]:
    for key, rows in facts.items():
        for fact in rows:
            if fact.state is ABSENT:
                continue
            writer = history.writer.get(fact.state)
            if writer is None or writer.key != key:
                yield Violation("unknown-origin", key, f"value {fact.state!r} seen by {fact.source} was never "
                                "written to this object")
            elif writer.outcome == "failed":
                yield Violation("failed-visible", key, f"value {fact.state!r} of a failed write "
                                f"({_describe(writer)}) seen by {fact.source} at revision {fact.revision}")
            elif writer.outcome == "ok" and fact.revision < writer.rv:
                yield Violation("too-early", key, f"value {fact.state!r} seen by {fact.source} at revision "
                                f"{fact.revision}, before its write committed at {writer.rv}")
            elif writer.outcome == "unknown" and fact.revision <= history.floor[id(writer)]:
                yield Violation("too-early", key, f"value {fact.state!r} of an unknown write seen by {fact.source} "
                                f"at revision {fact.revision}, but revision {history.floor[id(writer)]} was "
                                "acknowledged before that write started")


def _can_make(history: _History, key: str, state: str | None, low: int, high: int) -> bool:
    """Whether some write can have turned the object into ``state`` at a revision in (low, high]."""
    if state is not ABSENT:
        writer = history.writer.get(state)
        if writer is None or writer.outcome == "failed":
            return True  # reported by the origin check
        return writer.outcome == "unknown" or low < writer.rv <= high
    return any(d.key == key and (d.outcome == "unknown" or (d.outcome == "ok" and low < d.rv <= high))
               for d in history.writes if d.kind == "delete")


def _check_timeline(history: _History, facts: Mapping[str, list[_Fact]]) -> Iterable[Violation]:
    for key, rows in facts.items():
        rows = sorted(rows, key=lambda f: f.revision)
        timeline: list[_Fact] = []
        for fact in rows:
            if timeline and timeline[-1].revision == fact.revision:
                if timeline[-1].state != fact.state:
                    yield Violation("conflict", key, f"at revision {fact.revision} {timeline[-1].source} saw "
                                    f"{timeline[-1].state!r} but {fact.source} saw {fact.state!r}")
                continue
            timeline.append(fact)
        last_seen: dict[str, int] = {}
        for index, fact in enumerate(timeline):
            if fact.state is not ABSENT:
                if fact.state in last_seen and last_seen[fact.state] != index - 1:
                    between = timeline[last_seen[fact.state] + 1]
                    yield Violation("reappeared", key, f"value {fact.state!r} came back at revision {fact.revision} "
                                    f"({fact.source}) after {between.state!r} at {between.revision} ({between.source})")
                last_seen[fact.state] = index
            if index and timeline[index - 1].state != fact.state:
                before = timeline[index - 1]
                if not _can_make(history, key, fact.state, before.revision, fact.revision):
                    yield Violation("unexplained", key, f"{before.state!r} at revision {before.revision} "
                                    f"({before.source}) became {fact.state!r} at {fact.revision} ({fact.source}) "
                                    "with no write that can have done it")


def _check_lost(history: _History, final: Mapping[str, NodeState]) -> Iterable[Violation]:
    for op in history.writes:
        if op.outcome != "ok":
            continue
        mine = ABSENT if op.kind == "delete" else op.value
        missing = {}
        for node, state in sorted(final.items()):
            seen = state.objects.get(op.key)
            now = seen.value if seen is not None else ABSENT
            if now != mine and not _superseded(history, op, now):
                missing[node] = now
        if missing:
            what = "deletion" if op.kind == "delete" else f"value {op.value!r}"
            found = ", ".join(f"{node} has {now!r}" for node, now in missing.items())
            yield Violation("lost", op.key, f"the acknowledged {what} ({_describe(op)}, resourceVersion {op.rv}) "
                            f"is gone and no later write replaced it: {found}")


def _superseded(history: _History, op: Op, now: str | None) -> bool:
    """Whether the final state ``now`` can come from a write made after ``op``."""
    if now is not ABSENT:
        writer = history.writer.get(now)
        return writer is not None and writer.key == op.key and writer is not op and (
            writer.outcome == "unknown" or (writer.outcome == "ok" and writer.rv > op.rv))
    return any(d.key == op.key and d is not op and d.kind == "delete" and (
        d.outcome == "unknown" or (d.outcome == "ok" and d.rv > op.rv)) for d in history.writes)


def _check_replicas(history: _History, final: Mapping[str, NodeState]) -> Iterable[Violation]:
    if len(final) < 2:
        return
    nodes = sorted(final)
    for key in sorted({k for s in final.values() for k in s.objects}):
        seen = {node: final[node].objects.get(key) for node in nodes}
        if len(set(seen.values())) > 1:
            yield Violation("replicas-differ", key, "; ".join(f"{n}: {s}" for n, s in seen.items()))
            unknown = [w for w in history.writes if w.outcome == "unknown" and w.kind != "delete" and w.key == key
                       and any(s is not None and s.value == w.value for s in seen.values())]
            for write in unknown:
                holders = [n for n, s in seen.items() if s is not None and s.value == write.value]
                yield Violation("unknown-partial", key, f"the unknown write {write.value!r} is on "
                                f"{', '.join(holders)} only")


def _check_revision_order(history: _History) -> Iterable[Violation]:
    acked = [o for o in history.writes if o.outcome == "ok"]
    by_end = sorted(acked, key=lambda o: o.end)
    best: Op | None = None
    i = 0
    for op in sorted(acked, key=lambda o: o.start):
        while i < len(by_end) and by_end[i].end < op.start:
            if best is None or by_end[i].rv > best.rv:
                best = by_end[i]
            i += 1
        if best is not None and best.rv >= op.rv:
            yield Violation("revision-order", op.key, f"{_describe(op)} got resourceVersion {op.rv}, but "
                            f"{_describe(best)}, acknowledged before it started, had {best.rv}")


def _check_sessions(history: _History) -> Iterable[Violation]:
    by_client: dict[str, list[Op]] = defaultdict(list)
    for op in history.ops:
        by_client[op.client].append(op)
    for client, ops in by_client.items():
        per_key: dict[str, int] = {}
        revision = 0
        for op in ops:
            if op.outcome != "ok":
                continue
            if op.kind in WRITES:
                per_key[op.key] = max(per_key.get(op.key, 0), op.rv)
                revision = max(revision, op.rv)
            elif op.kind == "get" and op.read is not None:
                if op.read.rv < per_key.get(op.key, 0):
                    yield Violation("stale-read", op.key, f"{_describe(op)} read resourceVersion {op.read.rv} "
                                    f"after this client had seen or written {per_key[op.key]}")
                per_key[op.key] = max(per_key.get(op.key, 0), op.read.rv)
            elif op.kind == "list" and op.rv is not None:
                if op.rv < revision:
                    yield Violation("stale-read", None, f"{_describe(op)} listed at revision {op.rv} after this "
                                    f"client had seen or written {revision}")
                revision = max(revision, op.rv)
                for key, seen in (op.listed or {}).items():
                    per_key[key] = max(per_key.get(key, 0), seen.rv)


def check(ops: Sequence[Op], final: Mapping[str, NodeState]) -> Report:
    """Every violation of the history ``ops`` against the final state of each node."""
    history = _History(ops)
    facts = _facts(history, final)
    violations = [*_check_replicas(history, final), *_check_lost(history, final),
                  *_check_origins(history, facts), *_check_timeline(history, facts),
                  *_check_revision_order(history), *_check_sessions(history)]
    outcomes = Counter(o.outcome for o in history.writes)
    counts = {"operations": len(history.ops), "writes": len(history.writes), "acknowledged": outcomes["ok"],
              "failed": outcomes["failed"], "unknown": outcomes["unknown"],
              "reads": len(history.ops) - len(history.writes),
              "lost": sum(1 for v in violations if v.check == "lost")}
    return Report(tuple(violations), counts)
