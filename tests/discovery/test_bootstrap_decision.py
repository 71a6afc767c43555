"""The first-start decision as a table: who bootstraps, who waits, who joins whom."""
import pytest

from reconciler.discovery.bootstrap import Bootstrap, Join, Wait, decide
from reconciler.discovery.mdns import Announcement, cluster_id_from_secret

CLUSTER = cluster_id_from_secret("ours")
OTHER = cluster_id_from_secret("theirs")
WINDOW = 2.0


def node(n: int, *, formed: bool = False, leader: bool = False, cluster: str = CLUSTER) -> Announcement:
    return Announcement(cluster_id=cluster, node_id=f"00000000-0000-4000-8000-{n:012d}",
                        node_name=f"node-{n}", address=f"10.213.0.{n}", api_port=52415,
                        raft_port=52416, version="0.1.0", formed=formed, leader=leader)


def seen(*announcements: Announcement) -> dict[str, Announcement]:
    return {a.node_id: a for a in announcements}


def summary(decision) -> str:
    if isinstance(decision, Join):
        return f"join {decision.target.node_name}"
    if isinstance(decision, Bootstrap):
        return "bootstrap"
    if decision.awaiting:
        return f"wait for {int(decision.awaiting[-12:])}"
    return f"wait until {decision.until}"


TABLE = [
    # (case, self, candidates, now, expected)
    ("alone during the window", 1, [], 1.0, "wait until 2.0"),
    ("alone after the window", 1, [], 2.0, "bootstrap"),
    ("lowest after the window", 1, [node(2), node(3)], 2.5, "bootstrap"),
    ("not lowest after the window", 3, [node(1), node(2)], 2.5, "wait for 1"),
    ("not lowest during the window", 3, [node(1)], 0.5, "wait until 2.0"),
    ("existing cluster during the window", 1, [node(2, formed=True)], 0.1, "join node-2"),
    ("existing cluster beats a lower unformed id", 1, [node(2), node(5, formed=True)], 3.0, "join node-5"),
    ("leader hint is preferred", 9, [node(2, formed=True), node(4, formed=True, leader=True)], 3.0,
     "join node-4"),
    ("without a leader hint the lowest formed id", 9, [node(4, formed=True), node(2, formed=True)], 3.0,
     "join node-2"),
    ("other clusters are invisible", 3, [node(1, cluster=OTHER), node(2, formed=True, cluster=OTHER)], 3.0,
     "bootstrap"),
    ("its own announcement among the candidates changes nothing", 2, [node(2), node(3)], 3.0, "bootstrap"),
]


@pytest.mark.parametrize(("me", "candidates", "now", "expected"),
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_decision_table(me, candidates, now, expected):
    decision = decide(node(me), seen(*candidates), now=now, started_at=0.0, window=WINDOW)
    assert summary(decision) == expected


def test_a_candidate_found_down_is_left_out_so_the_next_lowest_bootstraps():
    down = frozenset({node(1).node_id})
    assert isinstance(decide(node(2), seen(node(1), node(3)), now=3.0, started_at=0.0, window=WINDOW,
                             unreachable=down), Bootstrap)


def test_a_formed_member_found_down_is_not_joined_when_another_member_is_up():
    down = frozenset({node(1).node_id})
    decision = decide(node(5), seen(node(1, formed=True), node(3, formed=True)), now=0.0, started_at=0.0,
                      window=WINDOW, unreachable=down)
    assert summary(decision) == "join node-3"


def test_the_window_is_counted_from_this_nodes_own_start():
    assert isinstance(decide(node(1), {}, now=101.9, started_at=100.0, window=WINDOW), Wait)
    assert isinstance(decide(node(1), {}, now=102.0, started_at=100.0, window=WINDOW), Bootstrap)


def test_a_node_that_already_belongs_to_a_cluster_is_not_asked_to_decide():
    with pytest.raises(ValueError, match="already belongs to a formed cluster"):
        decide(node(1, formed=True), {}, now=5.0, started_at=0.0, window=WINDOW)


def test_three_nodes_that_each_see_a_subset_at_first_end_as_one_cluster():
    # Node 1 saw nobody, node 2 saw only 1, node 3 saw only 2: one bootstrap, a chain of waits.
    views = {1: [], 2: [node(1)], 3: [node(2)]}
    first = {n: summary(decide(node(n), seen(*views[n]), now=2.0, started_at=0.0, window=WINDOW))
             for n in views}
    assert first == {1: "bootstrap", 2: "wait for 1", 3: "wait for 2"}
    # Node 1 announces formed: node 2 joins it; then node 2 announces formed and node 3 joins it.
    assert summary(decide(node(2), seen(node(1, formed=True)), now=2.2, started_at=0.0,
                          window=WINDOW)) == "join node-1"
    assert summary(decide(node(3), seen(node(2, formed=True)), now=2.4, started_at=0.0,
                          window=WINDOW)) == "join node-2"


def test_two_nodes_that_see_each_other_pick_the_same_bootstrapper():
    a = decide(node(1), seen(node(2)), now=2.0, started_at=0.0, window=WINDOW)
    b = decide(node(2), seen(node(1)), now=2.0, started_at=0.0, window=WINDOW)
    assert (summary(a), summary(b)) == ("bootstrap", "wait for 1")


def test_a_late_node_with_a_lower_id_joins_the_cluster_instead_of_bootstrapping():
    late = decide(node(0), seen(node(1, formed=True, leader=True), node(2, formed=True)), now=0.05,
                  started_at=0.0, window=WINDOW)
    assert summary(late) == "join node-1"


def test_a_node_waiting_on_the_window_is_told_when_to_decide_again():
    decision = decide(node(4), seen(node(7)), now=10.5, started_at=10.0, window=WINDOW)
    assert isinstance(decision, Wait) and decision.until == 12.0 and "1 candidate" in decision.reason
