"""The coherence protocol over 3 and 4 fragments under a seeded scheduler that reorders
deliveries across connections and interleaves every thread at each system call
(tests/coherence_explorer.py), plus mutants it must catch: today's protocol passes, and the
bugs below (one of them the one that broke 3-fragment guests) fail."""

import ctypes
import errno
import os
from typing import Any

import pytest

from coherence_explorer import ExplorationError, Explorer, explore
from spanvm.fabric.coherence import NO_OWNER, Coherence, nearest_rank
from spanvm.fabric.uffd import (
    PAGE_SIZE,
    UFFDIO_COPY,
    UFFDIO_COPY_MODE_WP,
    UffdError,
    UffdioCopy,
    Userfault,
)


@pytest.mark.parametrize(("fragments", "seeds"), [(3, 150), (4, 60)])
def test_protocol_holds_under_reordered_deliveries(fragments: int, seeds: int) -> None:
    steps = 0
    for seed in range(seeds):
        steps += explore(fragments, seed)
    assert steps > seeds * 100  # the runs did real work, not an early exit


@pytest.mark.parametrize("seed", range(40))
def test_several_vcpus_per_fragment_and_wide_readahead(seed: int) -> None:
    explore(3, seed, pages_per_home=2, vcpus_per_fragment=2, ops_per_vcpu=30, readahead=4)


class StagingUserfault(Userfault):
    """Userfault.install as it was before the fix: one staging buffer per userfaultfd,
    filled, then copied by the kernel. Threads installing at once overwrite each other's
    data between the fill and the ioctl (which releases the GIL)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._scratch = ctypes.create_string_buffer(64 * PAGE_SIZE)

    def install(
        self, address: int, data: bytes | None, writable: bool, pages: int = 1, offset: int = 0
    ) -> bool:
        length = pages * PAGE_SIZE
        if data is None:
            ctypes.memset(self._scratch, 0, length)
        else:
            ctypes.memmove(self._scratch, data[offset : offset + length], length)
        copy = UffdioCopy(
            dst=address,
            src=ctypes.addressof(self._scratch),
            len=length,
            mode=0 if writable else UFFDIO_COPY_MODE_WP,
        )
        result = self.kernel.ioctl(self.fd, UFFDIO_COPY, ctypes.addressof(copy))
        if result == -errno.EEXIST:
            self.wake(address)
            return False
        if result < 0:
            raise UffdError(-result, os.strerror(-result))
        return True


def test_explorer_finds_the_shared_staging_buffer_race() -> None:
    """The bug behind the stale reads and hangs on 3 fragments (issue 12): found within a
    few seeds, as stale data installed on a fragment."""
    failures = []
    for seed in range(40):
        try:
            explore(3, seed, userfault=StagingUserfault)
        except ExplorationError as err:
            failures.append(str(err))
    assert failures, "the explorer missed the staging-buffer race"
    assert any("the last write was" in f for f in failures)


class ForgetfulHome(Coherence):
    """A home that grants a write without invalidating a sharer other than itself."""

    def _serve_write(self, r: int, page: int, request_id: int, window: int = 1) -> None:
        if self.owner.get(page, self.index) == NO_OWNER:
            self.sharers[page] &= (1 << self.index) | (1 << r)
        super()._serve_write(r, page, request_id, window)


def test_explorer_finds_a_lost_invalidation() -> None:
    with pytest.raises(ExplorationError, match=r"writable on|the last write was"):
        for seed in range(40):
            explore(3, seed, coherence=ForgetfulHome)


@pytest.mark.parametrize(("fragments", "seeds"), [(2, 40), (3, 60), (4, 20)])
def test_sequential_runs_with_windows_asked_for_ahead(fragments: int, seeds: int) -> None:
    """Accesses that mostly continue a run make the fabric grow its read-ahead windows and
    ask for the next windows before the guest reaches them (several requests in flight per
    fragment, batched DOWNGRADEs behind them); the protocol must hold as without."""
    waited = moved = 0
    for seed in range(seeds):
        explorer = Explorer(
            fragments, seed, pages_per_home=12, readahead=4, sequential=0.8, ops_per_vcpu=40
        )
        try:
            explorer.run()
        finally:
            explorer.close()
        waited += sum(f.coherence.counters.prefetch_waits for f in explorer.fragments)
        moved += sum(f.coherence.counters.pages_moved for f in explorer.fragments)
    assert waited > 0  # guests did fault on pages whose windows were still in flight
    assert moved > 0  # sequential reads took pages only their home held (MIGRATE)


def test_whole_windows_and_take_backs_are_explored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bulk path of a sequential reader's window (`Coherence._move_all`) and a home's
    taking a run back (`Coherence._downgrade_run` with `take`, one page and batched) are
    explored too, under the same checks, not only the page-by-page decisions."""
    bulk: list[bool] = []
    taken: list[int] = []
    move_all, downgrade_run = Coherence._move_all, Coherence._downgrade_run

    def counted_move(self: Coherence, *args: Any) -> bool:
        bulk.append(move_all(self, *args))
        return bulk[-1]

    def counted_take(
        self: Coherence, owner: int, first: int, count: int, take: bool = False
    ) -> None:
        if take:
            taken.append(count)
        downgrade_run(self, owner, first, count, take)

    monkeypatch.setattr(Coherence, "_move_all", counted_move)
    monkeypatch.setattr(Coherence, "_downgrade_run", counted_take)
    for seed in range(20):
        explore(3, seed, pages_per_home=12, readahead=4, sequential=0.8, ops_per_vcpu=40)
    assert any(bulk) and not all(bulk)
    assert 1 in taken and any(count > 1 for count in taken)


class KeepingHome(Coherence):
    """A home that lets pages move to a sequential reader but keeps its own copies."""

    def _give_up(self, first: int, count: int) -> None:
        pass


def test_explorer_finds_a_home_that_keeps_a_moved_page() -> None:
    with pytest.raises(ExplorationError, match=r"writable on|the last write was"):
        for seed in range(40):
            explore(3, seed, pages_per_home=12, readahead=4, sequential=0.8, coherence=KeepingHome)


class ForgetfulBatchHome(Coherence):
    """A home that, after a batched DOWNGRADE, forgets the old owner keeps a Shared copy."""

    def _downgrade_run(self, owner: int, first: int, count: int, take: bool = False) -> None:
        super()._downgrade_run(owner, first, count, take)
        for page in range(first, first + count):
            if not take:  # a run taken back has no sharers left to forget
                self.sharers[page] &= ~(1 << owner)


def test_explorer_finds_a_forgotten_sharer_after_a_batched_downgrade() -> None:
    with pytest.raises(ExplorationError, match=r"writable on|the last write was|already held"):
        for seed in range(40):
            explore(
                3,
                seed,
                pages_per_home=12,
                readahead=4,
                sequential=0.8,
                coherence=ForgetfulBatchHome,
            )


def test_nearest_rank_percentiles() -> None:
    """The percentile the fragments report (remote faults, interrupt latency)."""
    samples = [float(v) for v in range(1, 101)]
    assert (nearest_rank(samples, 50), nearest_rank(samples, 99)) == (51.0, 100.0)
    assert nearest_rank([7.0], 99) == 7.0
