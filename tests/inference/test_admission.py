"""The entry node's generation slots and their queue (first come, first served)."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from reconciler.server.admission import Overloaded, RequestAdmission


async def hold(admission: RequestAdmission, release: asyncio.Event, log: list[str], name: str, **kw) -> None:
    async with admission.slot(**kw):
        log.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_beyond_the_slots_wait_in_order_and_beyond_the_queue_are_refused():
    admission = RequestAdmission(max_running=1, max_queued=2)
    gates = {name: asyncio.Event() for name in "abc"}
    log: list[str] = []
    tasks = [asyncio.create_task(hold(admission, gates[name], log, name)) for name in "abc"]
    await settle()
    assert (log, admission.running, admission.queued) == (["a"], 1, 2)
    with pytest.raises(Overloaded, match="1 requests are generating and 2 are queued"):
        async with admission.slot():
            pass
    gates["a"].set()
    await settle()
    assert log == ["a", "b"]
    gates["b"].set()
    gates["c"].set()
    await asyncio.gather(*tasks)
    assert (log, admission.running, admission.queued) == (["a", "b", "c"], 0, 0)


async def test_a_queued_request_that_is_cancelled_gives_up_its_place():
    admission = RequestAdmission(max_running=1, max_queued=1)
    release, log = asyncio.Event(), []
    first = asyncio.create_task(hold(admission, release, log, "first"))
    await settle()
    waiting = asyncio.create_task(hold(admission, release, log, "gone"))
    await settle()
    assert admission.queued == 1
    waiting.cancel()  # what aiohttp does to the handler when its client disconnects
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert admission.queued == 0
    release.set()
    await first
    assert (log, admission.running) == (["first"], 0)


async def test_a_cancelled_waiter_that_was_just_handed_the_slot_passes_it_on():
    admission = RequestAdmission(max_running=1, max_queued=2)
    release, log = asyncio.Event(), []
    first = asyncio.create_task(hold(admission, release, log, "first"))
    await settle()
    second = asyncio.create_task(hold(admission, asyncio.Event(), log, "second"))
    third = asyncio.create_task(hold(admission, release, log, "third"))
    await settle()
    release.set()
    await first                       # the slot is handed to "second" ...
    second.cancel()                   # ... which is cancelled before it runs
    with contextlib.suppress(asyncio.CancelledError):
        await second
    await third
    assert (log, admission.running, admission.queued) == (["first", "third"], 0, 0)
