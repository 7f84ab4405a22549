"""The periodic look at every SpanningVM: a Pending VM is placed when capacity appears, a
lost node is noticed, a pass that failed is tried again, with no event of the VM's own.

One task for the operator rather than a Kopf timer per VM: a Kopf timer makes Kopf put its
finalizer on every VM at its first event (timers require one), a write in the burst where
placements go first (`priority.py`); the operator adds its finalizer itself when the VM is
about to own something (`Reconciler._guard`). Every `interval` seconds, each VM of the
handled namespaces that is not being deleted and has no pass running gets one, each in its
own task (a pass may wait for its materialisation turn). Runs on the event loop.
"""

import asyncio
import contextlib
import logging

from spanvm.controller.cache import in_namespaces
from spanvm.controller.priority import Key
from spanvm.controller.reconcile import Reconciler

log = logging.getLogger("spanvm.operator")


class Recheck:
    """Passes for every VM, every `interval` seconds, until `stop`."""

    def __init__(self, reconciler: Reconciler, namespaces: list[str], interval: float) -> None:
        self.reconciler, self.namespaces, self.interval = reconciler, namespaces, interval
        self._passes: dict[Key, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        """Start looking (idempotent; not again once stopped)."""
        if not self._stopped and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._forever(), name="spanvm-recheck")

    async def stop(self) -> None:
        """Stop looking and cancel the passes it started."""
        self._stopped = True
        tasks = [t for t in (self._task, *self._passes.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._passes.clear()
        self._task = None

    def sweep(self) -> int:
        """Start one pass for each VM that wants one now; returns how many were started."""
        self._passes = {k: t for k, t in self._passes.items() if not t.done()}
        started = 0
        for vm in in_namespaces(self.reconciler.cache.vms.items(), self.namespaces):
            meta = vm["metadata"]
            key = (meta["namespace"], meta["name"])
            if meta.get("deletionTimestamp") or key in self._passes:
                continue  # the deletion handler owns it, or our pass still runs
            if self.reconciler.busy(*key):
                continue  # an event's pass runs (it may wait for its turn)
            self._passes[key] = asyncio.create_task(self._pass(key))
            started += 1
        return started

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.sweep()
            except Exception:  # a bug: say so, and keep looking (nothing else would)
                log.exception("the periodic recheck's sweep failed")

    async def _pass(self, key: Key) -> None:
        try:
            await self.reconciler.reconcile(*key)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # reported by the pass (status, Event); the next sweep retries
            log.warning("[%s/%s] periodic pass failed: %s: %s", *key, type(err).__name__, err)
