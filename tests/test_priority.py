"""Placements before everything else (`controller/priority.py`): held-back work waits while a
VM waits for its placement, goes once none has for `quiet` seconds, and never waits longer
than `longest`; a VM whose write was lost stops holding others back after `stale`."""

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from spanvm.controller.priority import PlacementFirst

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_nothing_waiting_goes_after_the_quiet_time_only() -> None:
    async def main() -> float:
        gate = PlacementFirst(quiet=0.05, longest=5.0)
        await asyncio.sleep(0.06)  # idle since construction for longer than `quiet`
        return await gate.turn()

    assert run(main()) < 0.02


def test_held_back_work_goes_once_the_last_placement_is_written() -> None:
    async def main() -> tuple[float, float]:
        gate = PlacementFirst(quiet=0.05, longest=5.0)
        gate.wait_for_placement(("ns", "a"))
        gate.wait_for_placement(("ns", "b"))
        started = time.monotonic()

        async def place() -> float:
            await asyncio.sleep(0.1)
            gate.done(("ns", "a"))
            await asyncio.sleep(0.1)
            gate.done(("ns", "b"))
            return time.monotonic() - started

        waited, placed_at = await asyncio.gather(gate.turn(), place())
        return waited, placed_at

    waited, placed_at = run(main())
    # it waited for the second placement (0.2 s) and the quiet time after it (0.05 s)
    assert placed_at >= 0.19
    assert placed_at + 0.04 <= waited < placed_at + 1.0


def test_a_steady_stream_of_new_vms_never_starves_held_back_work() -> None:
    async def main() -> float:
        gate = PlacementFirst(quiet=0.05, longest=0.3)
        stop = asyncio.Event()

        async def arrivals() -> None:
            i = 0
            while not stop.is_set():
                gate.wait_for_placement(("ns", f"vm-{i}"))
                if i:
                    gate.done(("ns", f"vm-{i - 1}"))
                i += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(arrivals())
        waited = await gate.turn()
        stop.set()
        await task
        return waited

    waited = run(main())
    assert 0.3 <= waited < 1.0


def test_a_vm_whose_write_was_lost_stops_holding_others_back() -> None:
    async def main() -> float:
        gate = PlacementFirst(quiet=0.01, longest=5.0, stale=0.2)
        gate.wait_for_placement(("ns", "lost"))  # never done
        return await gate.turn()

    waited = run(main())
    assert 0.2 <= waited < 1.0


def test_done_is_idempotent_and_counts_what_waits() -> None:
    async def main() -> list[int]:
        gate = PlacementFirst()
        counts = [gate.waiting]
        gate.wait_for_placement(("ns", "a"))
        gate.wait_for_placement(("ns", "a"))
        counts.append(gate.waiting)
        gate.done(("ns", "a"))
        gate.done(("ns", "a"))
        gate.done(("ns", "never"))
        counts.append(gate.waiting)
        return counts

    assert run(main()) == [0, 1, 0]
