"""Admission of generation requests on an entry node: at most ``max_running`` generate at once,
at most ``max_queued`` wait (first come, first served) for a slot; a request beyond that is
refused at once (the API's 429), so one client's burst never makes the others wait unbounded.
A queued request whose client leaves is cancelled (the node's handlers are cancelled when their
client disconnects) and gives up its place."""
from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class Overloaded(Exception):
    """Every slot is taken and the queue is full."""


class RequestAdmission:
    def __init__(self, *, max_running: int, max_queued: int) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError(f"max_running must be >= 1 and max_queued >= 0, got {max_running}, {max_queued}")
        self.max_running, self.max_queued = max_running, max_queued
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one generation slot for the body of the ``async with``. Raises ``Overloaded`` when
        the queue is full."""
        if self.running < self.max_running and not self._waiters:
            self.running += 1
        elif len(self._waiters) >= self.max_queued:
            raise Overloaded(f"{self.running} requests are generating and {len(self._waiters)} are queued "
                             f"on this node (limits {self.max_running} and {self.max_queued})")
        else:
            await self._wait_in_queue()
        try:
            yield
        finally:
            self._release()

    async def _wait_in_queue(self) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await asyncio.shield(turn)
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._release()  # the slot was handed to us as we left: pass it on
            else:
                turn.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(turn)
            raise

    def _release(self) -> None:
        """A slot is free: hand it to the first waiter still waiting, else count it free."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # ``running`` is unchanged: the slot changes hands
                return
        self.running -= 1
