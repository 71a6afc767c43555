"""Runs level-triggered controllers: each is woken by committed changes to the kinds it watches
(and by a slow resync), reconciles one pass at a time, and backs off after errors. Leader-only
controllers run only while this node's store is the Raft leader."""
from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from reconciler.store.base import Store, StoreError, StoreUnavailable
from reconciler.store.state import StoreState

log = logging.getLogger(__name__)


class Controller(ABC):
    name: str = "controller"
    watches: tuple[str, ...] = ()      # kinds whose changes wake this controller
    leader_only: bool = False
    resync_seconds: float = 5.0         # wake at least this often even without changes

    @abstractmethod
    async def reconcile(self) -> None:
        """One level-triggered pass: read current state, compute actions, act."""

    def stop(self) -> None:
        """Called when the controller stops running (also when leadership is lost)."""

    def request_pass(self) -> None:
        """Ask for another pass soon: for work the controller finished outside a pass (a thread,
        a background read) whose result no store change announces. Set by the manager."""


ReconcileObserver = Callable[[str, str, float], None]  # (controller, result, seconds)


class ControllerManager:
    def __init__(self, *, store: Store, controllers: list[Controller],
                 observer: ReconcileObserver | None = None, leadership_check_seconds: float = 0.5,
                 max_backoff: float = 5.0) -> None:
        self.store = store
        self.controllers = controllers
        self.observer = observer
        self.leadership_check_seconds = leadership_check_seconds
        self.max_backoff = max_backoff
        self._wake: dict[str, asyncio.Event] = {c.name: asyncio.Event() for c in controllers}
        self._tasks: list[asyncio.Task] = []
        self._last_revision = store.revision
        self._unsubscribe: Callable[[], None] | None = None
        for controller in controllers:
            controller.request_pass = self._wake[controller.name].set  # type: ignore[method-assign]

    def queue_depth(self) -> int:
        return sum(1 for event in self._wake.values() if event.is_set())

    def start(self) -> None:
        self._unsubscribe = self.store.add_listener(self._on_change)
        for controller in self.controllers:
            self._wake[controller.name].set()
            self._tasks.append(asyncio.create_task(self._run(controller), name=f"controller:{controller.name}"))

    async def stop(self) -> None:
        if self._unsubscribe:
            self._unsubscribe()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for controller in self.controllers:
            controller.stop()
        self._tasks.clear()

    def wake(self, name: str | None = None) -> None:
        for controller in self.controllers:
            if name is None or controller.name == name:
                self._wake[controller.name].set()

    def _on_change(self, state: StoreState) -> None:
        kinds = {event.object.get("kind") for event in state.events_after(self._last_revision)}
        self._last_revision = state.revision
        for controller in self.controllers:
            if not controller.watches or kinds & set(controller.watches):
                self._wake[controller.name].set()

    def _active(self, controller: Controller) -> bool:
        return not controller.leader_only or self.store.is_leader

    async def _run(self, controller: Controller) -> None:
        wake = self._wake[controller.name]
        failures, was_active, last_pass = 0, False, float("-inf")
        # Leader-only controllers look at leadership this often (a cheap flag read, not a reconcile).
        poll = self.leadership_check_seconds if controller.leader_only else controller.resync_seconds
        while True:
            active = self._active(controller)
            if was_active and not active:
                controller.stop()
            if active and (not was_active or time.monotonic() - last_pass >= controller.resync_seconds):
                wake.set()  # a new leader reconciles at once; everyone resyncs now and then
            was_active = active
            if not active:
                wake.clear()  # changes seen while a follower are covered by the pass on election
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel (stop() hangs)
                async with asyncio.timeout(poll):
                    await wake.wait()
            except TimeoutError:
                continue
            if not self._active(controller):
                continue
            wake.clear()
            started = time.monotonic()
            try:
                await controller.reconcile()
                result, failures = "success", 0
            except asyncio.CancelledError:
                raise
            except (StoreUnavailable, StoreError) as error:
                result, failures = "error", failures + 1
                log.info("%s: %s; retrying", controller.name, error)
            except Exception:  # a bug in one pass must not kill the controller
                result, failures = "error", failures + 1
                log.exception("%s: reconcile failed", controller.name)
            last_pass = time.monotonic()
            if self.observer:
                self.observer(controller.name, result, last_pass - started)
            if failures:
                await asyncio.sleep(min(self.max_backoff, 0.1 * 2 ** min(failures, 6)))
                wake.set()
