"""ExoNode.stop()'s steps: each bounded, one stuck or failing part logged and skipped so the
rest of the shutdown still runs (through real node processes: tests/e2e/test_shutdown.py)."""
from __future__ import annotations

import asyncio
import logging

from reconciler.node import _StopSteps


async def stuck() -> None:
    await asyncio.Event().wait()


async def test_a_stuck_step_is_cut_short_and_logged_and_the_next_steps_still_run(caplog):
    ran: list[str] = []

    async def failing() -> None:
        raise RuntimeError("boom")

    async def last() -> None:
        ran.append("last")

    steps = _StopSteps(budget_s=30.0)
    with caplog.at_level(logging.WARNING, logger="reconciler.node"):
        await steps.run("stuck part", stuck(), at_most_s=0.05)
        await steps.run("failing part", failing(), at_most_s=1.0)
        await steps.run("last part", last(), at_most_s=1.0)
    assert ran == ["last"]
    assert "shutdown: stuck part cut short after 0.05s" in caplog.text
    assert "shutdown: failing part failed" in caplog.text and "boom" in caplog.text
    assert "last part" not in caplog.text


async def test_once_the_budget_is_spent_a_step_gets_only_a_sliver_of_time(caplog):
    now = [100.0]
    steps = _StopSteps(budget_s=3.0, clock=lambda: now[0])
    now[0] += 10.0  # earlier steps used up the budget
    with caplog.at_level(logging.WARNING, logger="reconciler.node"):
        await steps.run("Raft store", stuck(), at_most_s=60.0)
    assert "shutdown: Raft store cut short after 0.05s" in caplog.text
    assert steps.elapsed() == 10.0
