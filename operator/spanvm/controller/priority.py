"""Placements before everything else: a VM waiting for its placement write goes ahead of the
other VMs' Secrets, VMFragments and Scheduled Events (and what their passes write after).

When hundreds of SpanningVMs are applied at once, the API server is the bottleneck (about one
of the development machine's two cores, ~170-360 SpanningVM writes/s alone: docs/operator.md,
Measured). A VM is Scheduled by one status write; its other writes can wait a moment.
Without an order, the VMs applied last wait behind the earlier VMs' 7-9 other writes each.
`PlacementFirst` holds the materialisation of placed VMs (their finalizer first) back while
any VM is waiting for its placement, as kube-scheduler's binding comes before a kubelet's
work, and lets it go once the set of waiting VMs has stayed empty for `quiet` seconds, or
after `longest` seconds in any case (a steady stream of new VMs never starves a placed one).
Passes started by fragment events (peers, Starting) are not held.

A VM waits from the first time the operator sees it without a status or the operator's
finalizer (its first pass places it next), or from when a decision places it, until its
placement write is back (or fails), its status is seen, or it is deleted; a VM still waiting
after `stale` seconds (a write that was lost) no longer holds others back. All methods run on
the event loop.
"""

import asyncio
import contextlib
import time

Key = tuple[str, str]  # namespace, name
QUIET = 0.25  # seconds the waiting set must stay empty before held-back work goes
LONGEST = 10.0  # seconds held-back work waits at most
STALE = 30.0  # seconds after which a VM still waiting is not waited for


class PlacementFirst:
    """The set of VMs waiting for a placement, and a turn for work that must not delay them."""

    def __init__(
        self, quiet: float = QUIET, longest: float = LONGEST, stale: float = STALE
    ) -> None:
        self.quiet, self.longest, self.stale = quiet, longest, stale
        self._waiting: dict[Key, float] = {}  # VM -> since when (monotonic)
        self._idle = asyncio.Event()
        self._idle.set()
        self._idle_since = time.monotonic()

    @property
    def waiting(self) -> int:
        """How many VMs wait for a placement now."""
        return len(self._waiting)

    def wait_for_placement(self, key: Key) -> None:
        """The VM `key` needs a placement before its pass ends."""
        self._waiting.setdefault(key, time.monotonic())
        self._idle.clear()

    def done(self, key: Key) -> None:
        """A pass of `key` ended (or the VM is gone): it no longer holds others back."""
        if self._waiting.pop(key, None) is not None and not self._waiting:
            self._idle_since = time.monotonic()
            self._idle.set()

    async def turn(self) -> float:
        """Return once no VM has been waiting for a placement for `quiet` seconds in a row,
        or after `longest` seconds; returns the seconds waited."""
        started = time.monotonic()
        deadline = started + self.longest
        while True:
            now = time.monotonic()
            for key in [k for k, since in self._waiting.items() if now - since > self.stale]:
                self.done(key)
            if now >= deadline:
                return now - started
            if not self._idle.is_set():
                stale_at = min(self._waiting.values()) + self.stale
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), min(deadline, stale_at) - now)
                continue
            calm = now - self._idle_since
            if calm >= self.quiet:
                return now - started
            await asyncio.sleep(min(self.quiet - calm, deadline - now))
