"""Chaos benchmark: three local ``exo`` nodes, clients applying, updating, deleting, getting and
listing ModelDeployments while nodes are killed with SIGKILL, then checked by the history
checker (tests/chaos/history.py).

    uv run python -m bench.chaos [--seconds 180] [--clients 4] [--power-loss-rounds 10] [--seed N]
    uv run python -m bench.chaos --any-node      # clients pick a random node per operation
    uv run python -m bench.chaos --smoke         # a few seconds of each phase (CI)

Phase 1 kills one node at a time (the leader half the time) and restarts it, never losing
quorum; phase 2 kills every node at once at a random moment during writes and restarts them
all, ``--power-loss-rounds`` times. Each phase runs on a fresh cluster. Lost must be 0.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import print_table  # noqa: E402
from harness.chaos_history import check  # noqa: E402
from harness.chaos_runner import APPLIED_TRUNCATION, ChaosRun  # noqa: E402
from harness.cluster import start_cluster  # noqa: E402


def phase(name: str, root: Path, args: argparse.Namespace, seed: int) -> tuple[list[object], bool]:
    cluster = start_cluster(3, root / name)
    try:
        run = ChaosRun(cluster, seed=seed, log=lambda line: print(line, file=sys.stderr, flush=True))
        began = time.monotonic()
        run.start_clients(args.clients, sticky=not args.any_node)
        try:
            if name == "one-at-a-time":
                run.kill_one_at_a_time(seconds=args.seconds)
            else:
                for _ in range(args.power_loss_rounds):
                    run.power_loss()
                time.sleep(1.0)
        finally:
            run.stop_clients()
        report = check(run.ops, run.final_states())
        elapsed = time.monotonic() - began
        if not report.ok:
            print(f"{name}: {report.summary()}", file=sys.stderr)
        counts = report.counts
        rounds = run.power_losses if name == "power-loss" else "-"
        return [name, f"{elapsed:.0f}", counts["operations"], counts["acknowledged"], counts["failed"],
                counts["unknown"], counts["lost"], len(report.violations), run.kills, rounds,
                run.log_count(APPLIED_TRUNCATION)], report.ok
    except BaseException:
        print(cluster.logs()[-20000:], file=sys.stderr)
        raise
    finally:
        cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="chaos of phase 1 (kill one at a time)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--power-loss-rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--any-node", action="store_true", help="a random node per operation (reads may be stale)")
    parser.add_argument("--smoke", action="store_true", help="5 s of phase 1, one power loss")
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.power_loss_rounds, args.clients = 5.0, 1, 3
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"chaos seed {seed} (replay with --seed {seed})", flush=True)
    rows, clean = [], True
    with tempfile.TemporaryDirectory(prefix="exo-chaos-") as tmp:
        for name in ("one-at-a-time", "power-loss"):
            row, ok = phase(name, Path(tmp), args, seed)
            rows.append(row)
            clean = clean and ok
    print_table(f"Chaos: 3 nodes, {args.clients} clients, kill -9 (seed {seed})",
                ["phase", "s", "operations", "acknowledged", "failed", "unknown", "lost", "violations",
                 "nodes killed", "power-loss rounds", "applied entries truncated (log lines)"], rows)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
