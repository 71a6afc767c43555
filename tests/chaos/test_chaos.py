"""Chaos through three real ``exo`` processes: four clients apply, update, delete, get and list
continuously while nodes are killed with SIGKILL and restarted one at a time (quorum kept) for
~30 s; the history checker then finds no violation. A client session talks to one node and a
client that fails over starts a new session: reads come from the local replica, so a read through
another node can be a few revisions behind the client's own write (``bench.chaos --any-node``
counts those). The seed is printed; replay a run with ``EXO_CHAOS_SEED=<seed>`` (the clients' and
the killer's choices repeat, the timing does not)."""
from __future__ import annotations

import os
import time

import pytest

from harness.chaos_history import check
from harness.chaos_runner import APPLIED_TRUNCATION, ChaosRun, chaos_seed

pytestmark = pytest.mark.slow

CHAOS_SECONDS = float(os.environ.get("EXO_CHAOS_SECONDS", "30"))


@pytest.mark.timeout(180)
def test_no_acknowledged_write_is_lost_while_nodes_are_killed_one_at_a_time(exo_cluster):
    cluster = exo_cluster(3)
    run = ChaosRun(cluster, seed=chaos_seed())
    began = time.monotonic()
    run.start_clients(4)
    try:
        run.kill_one_at_a_time(seconds=CHAOS_SECONDS)
    finally:
        run.stop_clients()
    report = check(run.ops, run.final_states())
    print(f"chaos {time.monotonic() - began:.0f} s, nodes killed {run.kills}, PySyncObj truncations of applied "
          f"entries {run.log_count(APPLIED_TRUNCATION)}: {report.summary()}")
    assert report.ok, f"seed {run.seed}: {report.summary()}"
    assert run.kills >= 3
    assert report.counts["acknowledged"] >= 50, report.counts
    assert report.counts["reads"] >= 50, report.counts
