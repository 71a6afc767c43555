"""Power loss: four clients write through three real ``exo`` processes and, at a random moment,
every node is killed with SIGKILL at once and restarted; three rounds (``EXO_POWER_LOSS_ROUNDS``,
bench/chaos.py runs ten). Afterwards every node serves the same objects and every acknowledged
write is there (the history checker of tests/chaos). The seed is printed
(``EXO_CHAOS_SEED=<seed>`` replays the choices)."""
from __future__ import annotations

import os
import time

import pytest

from harness.chaos_history import check
from harness.chaos_runner import ChaosRun, chaos_seed

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("EXO_POWER_LOSS_ROUNDS", "3"))


@pytest.mark.timeout(240)
def test_every_acknowledged_write_survives_kill_9_of_all_nodes_at_random_moments(exo_cluster):
    cluster = exo_cluster(3)
    run = ChaosRun(cluster, seed=chaos_seed())
    began = time.monotonic()
    run.start_clients(4)
    try:
        for _ in range(ROUNDS):
            run.power_loss()
        time.sleep(1.0)  # writes after the last restart too
    finally:
        run.stop_clients()
    report = check(run.ops, run.final_states())
    print(f"power loss: {run.power_losses} rounds in {time.monotonic() - began:.0f} s: {report.summary()}")
    assert report.ok, f"seed {run.seed}: {report.summary()}"
    assert run.power_losses == ROUNDS
    assert report.counts["acknowledged"] >= 20, report.counts
