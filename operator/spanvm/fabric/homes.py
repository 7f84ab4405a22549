"""Which fragment is home for each guest page: the split of coherent memory by policy."""

import bisect
from dataclasses import dataclass

from spanvm.shares import share_ranges
from spanvm.vmm.layout import IMAGE_BASE
from spanvm.vmm.memmap import ram_ranges

PAGE = 4096


@dataclass(frozen=True)
class HomeRange:
    """Guest-physical [start, end) homed on fragment `index`."""

    start: int
    end: int
    index: int


def coherent_ranges(memory_size: int, platform: bool = False) -> list[tuple[int, int]]:
    """Guest-physical ranges kept coherent: all RAM above the per-fragment system area of a
    payload, or all RAM from 0 for a `platform` guest (it owns its whole memory)."""
    out = []
    for r in ram_ranges(memory_size):
        start = r.gpa if platform else max(r.gpa, IMAGE_BASE)
        if start < r.end:
            out.append((start, r.end))
    return out


def plan_homes(
    memory_size: int, shares: list[int], policy: str = "proportional", platform: bool = False
) -> list[HomeRange]:
    """Home ranges for each fragment: `proportional` makes each fragment home for its share
    of guest memory (`spanvm.shares`: the bytes the scheduler reserved on its node), laid out
    in fragment order; `first` homes everything on fragment 0 (as GiantVM does). Only
    coherent memory has a home (`coherent_ranges`)."""
    ranges = coherent_ranges(memory_size, platform)
    if policy == "first":
        return [HomeRange(s, e, 0) for s, e in ranges]
    if policy != "proportional":
        raise ValueError(f"home policy {policy!r} is not implemented (use proportional or first)")
    if sum(shares) != memory_size:
        raise ValueError(f"shares {shares} do not add up to guest memory {memory_size}")
    out = []
    for start, end, index in share_ranges(memory_size, shares):
        for lo, hi in ranges:
            if max(start, lo) < min(end, hi):
                out.append(HomeRange(max(start, lo), min(end, hi), index))
    return out


class HomeMap:
    """Looks up the home fragment of a page id (guest-physical address >> 12)."""

    def __init__(self, homes: list[HomeRange]) -> None:
        self.homes = sorted(homes, key=lambda h: h.start)
        self._starts = [h.start for h in self.homes]

    def range_of(self, page: int) -> HomeRange:
        """The home range holding a page id (KeyError outside coherent memory); a binary
        search, as it runs on every fault."""
        address = page * PAGE
        at = bisect.bisect_right(self._starts, address) - 1
        if at >= 0 and address < self.homes[at].end:
            return self.homes[at]
        raise KeyError(f"guest-physical {address:#x} is not coherent memory")

    def home(self, page: int) -> int:
        return self.range_of(page).index
