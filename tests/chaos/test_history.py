"""The history checker on hand-written histories: correct ones pass, each kind of anomaly is
reported by name."""
from __future__ import annotations

import pytest

from harness.chaos_history import NodeState, Observed, Op, check

NODES = ("node0", "node1", "node2")


def write(kind: str, key: str, value: str | None, *, at: tuple[float, float], outcome: str = "ok",
          rv: int | None = None, client: str = "c1") -> Op:
    return Op(client=client, kind=kind, key=key, start=at[0], end=at[1], outcome=outcome, value=value,
              rv=rv if outcome == "ok" else None)


def get(key: str, seen: tuple[int, str] | None, *, at: tuple[float, float], client: str = "c1") -> Op:
    return Op(client=client, kind="get", key=key, start=at[0], end=at[1], outcome="ok",
              read=Observed(*seen) if seen else None)


def listing(revision: int, objects: dict[str, tuple[int, str]], *, at: tuple[float, float],
            client: str = "c1") -> Op:
    return Op(client=client, kind="list", key=None, start=at[0], end=at[1], outcome="ok", rv=revision,
              listed={k: Observed(*v) for k, v in objects.items()})


def everywhere(revision: int, objects: dict[str, tuple[int, str]]) -> dict[str, NodeState]:
    return {node: NodeState(revision, {k: Observed(*v) for k, v in objects.items()}) for node in NODES}


def checks(report) -> set[str]:
    return {v.check for v in report.violations}


def test_a_correct_history_with_applies_updates_deletes_and_reads_has_no_violation():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5),
           get("a", (5, "c1-1"), at=(1, 2), client="c2"),
           write("update", "a", "c2-1", at=(2, 3), rv=7, client="c2"),
           write("apply", "b", "c1-2", at=(2, 3), rv=8),
           listing(8, {"a": (7, "c2-1"), "b": (8, "c1-2")}, at=(3, 4)),
           write("delete", "b", None, at=(4, 5), rv=9),
           get("a", (10, "c2-1"), at=(5, 6))]  # a status write moved a's resourceVersion
    report = check(ops, everywhere(12, {"a": (10, "c2-1")}))
    assert report.ok, report.summary()
    assert report.counts == {"operations": 7, "writes": 4, "acknowledged": 4, "failed": 0, "unknown": 0,
                             "reads": 3, "lost": 0}


def test_an_acknowledged_write_missing_at_the_end_is_lost():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5)]
    report = check(ops, everywhere(9, {}))
    assert checks(report) >= {"lost", "unexplained"}
    assert report.counts["lost"] == 1


def test_an_older_write_that_wins_over_a_later_acknowledged_one_loses_the_later_one():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5), write("apply", "a", "c2-1", at=(2, 3), rv=6, client="c2")]
    report = check(ops, everywhere(9, {"a": (5, "c1-1")}))
    assert "lost" in checks(report)
    assert "reappeared" in checks(report)
    assert "c2-1" in report.of("lost")[0].message


def test_an_acknowledged_delete_undone_at_the_end_is_lost():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5), write("delete", "a", None, at=(2, 3), rv=6)]
    report = check(ops, everywhere(9, {"a": (5, "c1-1")}))
    assert "lost" in checks(report)


def test_a_later_unknown_write_may_supersede_an_acknowledged_one():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5),
           write("apply", "a", "c2-1", at=(2, 3), outcome="unknown", client="c2")]
    assert check(ops, everywhere(9, {"a": (7, "c2-1")})).ok


def test_an_unknown_write_may_take_effect_after_its_client_gave_up():
    ops = [write("apply", "a", "c1-1", at=(0, 1), outcome="unknown"),
           write("apply", "a", "c2-1", at=(2, 3), rv=7, client="c2")]
    report = check(ops, everywhere(12, {"a": (9, "c1-1")}))
    assert report.ok, report.summary()


def test_an_unknown_write_present_nowhere_is_fine():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5),
           write("apply", "a", "c1-2", at=(2, 3), outcome="unknown")]
    assert check(ops, everywhere(9, {"a": (5, "c1-1")})).ok


def test_an_unknown_write_present_on_some_nodes_only_is_reported():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5),
           write("apply", "a", "c1-2", at=(2, 3), outcome="unknown")]
    final = everywhere(9, {"a": (5, "c1-1")})
    final["node2"] = NodeState(9, {"a": Observed(8, "c1-2")})
    report = check(ops, final)
    assert {"replicas-differ", "unknown-partial"} <= checks(report)
    assert "node2" in report.of("unknown-partial")[0].message


def test_replicas_that_end_with_different_resource_versions_are_reported():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5)]
    final = everywhere(9, {"a": (5, "c1-1")})
    final["node1"] = NodeState(9, {"a": Observed(6, "c1-1")})
    assert "replicas-differ" in checks(check(ops, final))


def test_the_value_of_a_failed_write_seen_by_a_read_is_reported():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5),
           write("update", "a", "c1-2", at=(1, 2), outcome="failed"),
           get("a", (6, "c1-2"), at=(2, 3), client="c2")]
    report = check(ops, everywhere(9, {"a": (5, "c1-1")}))
    assert "failed-visible" in checks(report)


def test_the_value_of_a_failed_write_in_the_final_state_is_reported():
    ops = [write("apply", "a", "c1-1", at=(0, 1), outcome="failed")]
    assert "failed-visible" in checks(check(ops, everywhere(9, {"a": (6, "c1-1")})))


def test_a_value_nobody_wrote_is_reported():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5)]
    report = check(ops, everywhere(9, {"a": (5, "c1-1"), "b": (7, "ghost")}))
    assert "unknown-origin" in checks(report)


def test_a_later_write_with_a_smaller_resource_version_is_reported():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=9), write("apply", "b", "c2-1", at=(2, 3), rv=8, client="c2")]
    report = check(ops, everywhere(12, {"a": (9, "c1-1"), "b": (8, "c2-1")}))
    assert checks(report) == {"revision-order"}


def test_overlapping_writes_may_commit_in_either_order():
    ops = [write("apply", "a", "c1-1", at=(0, 3), rv=9), write("apply", "b", "c2-1", at=(1, 2), rv=8, client="c2")]
    assert check(ops, everywhere(12, {"a": (9, "c1-1"), "b": (8, "c2-1")})).ok


def test_a_client_that_reads_an_older_version_than_it_wrote_is_reported():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5), write("apply", "a", "c1-2", at=(1, 2), rv=6),
           get("a", (5, "c1-1"), at=(2, 3))]
    report = check(ops, everywhere(9, {"a": (6, "c1-2")}))
    assert "stale-read" in checks(report)


def test_a_client_that_lists_at_an_older_revision_than_it_saw_is_reported():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5), listing(9, {"a": (5, "c1-1")}, at=(1, 2)),
           listing(7, {"a": (5, "c1-1")}, at=(2, 3))]
    report = check(ops, everywhere(9, {"a": (5, "c1-1")}))
    assert checks(report) == {"stale-read"}


def test_a_value_seen_before_its_write_committed_is_reported():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5), get("a", (4, "c1-1"), at=(0.5, 0.6), client="c2")]
    assert "too-early" in checks(check(ops, everywhere(9, {"a": (5, "c1-1")})))


def test_an_unknown_write_seen_at_a_revision_acknowledged_before_it_started_is_reported():
    ops = [write("apply", "b", "c2-1", at=(0, 1), rv=10, client="c2"),
           write("apply", "a", "c1-1", at=(2, 3), outcome="unknown"),
           get("a", (9, "c1-1"), at=(3, 4))]
    assert "too-early" in checks(check(ops, everywhere(12, {"a": (9, "c1-1"), "b": (10, "c2-1")})))


def test_an_object_that_vanishes_with_no_delete_is_reported_and_an_unknown_delete_explains_it():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5), listing(8, {}, at=(1, 2), client="c2")]
    report = check(ops, everywhere(9, {"a": (5, "c1-1")}))
    assert {"unexplained", "reappeared"} <= checks(report)
    with_delete = [*ops[:1], write("delete", "a", None, at=(1, 1.5), outcome="unknown", client="c3"), ops[1]]
    report = check(with_delete, everywhere(9, {}))
    assert report.ok, report.summary()


def test_two_states_at_one_revision_are_a_conflict():
    ops = [write("apply", "a", "c1-1", at=(0, 1), rv=5), write("apply", "a", "c2-1", at=(0, 1), outcome="unknown",
                                                             client="c2"),
           get("a", (5, "c2-1"), at=(1, 2))]
    assert "conflict" in checks(check(ops, everywhere(9, {"a": (5, "c1-1")})))


def test_a_history_that_reuses_a_value_or_omits_a_resource_version_is_refused():
    with pytest.raises(ValueError, match="written twice"):
        check([write("apply", "a", "v", at=(0, 1), rv=5), write("apply", "a", "v", at=(1, 2), rv=6)], {})
    with pytest.raises(ValueError, match="must carry the resourceVersion"):
        check([Op(client="c1", kind="apply", key="a", start=0, end=1, outcome="ok", value="v")], {})
