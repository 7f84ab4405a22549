"""Which fragment is home for each guest page: the split of coherent memory by policy."""

from dataclasses import dataclass

from spanvm.vmm.layout import IMAGE_BASE
from spanvm.vmm.memmap import ram_ranges

PAGE = 4096


@dataclass(frozen=True)
class HomeRange:
    """Guest-physical [start, end) homed on fragment `index`."""

    start: int
    end: int
    index: int


def coherent_ranges(memory_size: int) -> list[tuple[int, int]]:
    """Guest-physical ranges kept coherent: all RAM above the per-fragment system area."""
    out = []
    for r in ram_ranges(memory_size):
        start = max(r.gpa, IMAGE_BASE)
        if start < r.end:
            out.append((start, r.end))
    return out


def plan_homes(
    memory_size: int, vcpus_per_fragment: list[int], policy: str = "proportional"
) -> list[HomeRange]:
    """Home ranges for each fragment: `proportional` gives each a contiguous share sized by its
    vCPUs (in order), `first` homes everything on fragment 0 (as GiantVM does)."""
    ranges = coherent_ranges(memory_size)
    if policy == "first":
        return [HomeRange(s, e, 0) for s, e in ranges]
    if policy != "proportional":
        raise ValueError(f"home policy {policy!r} is not implemented (use proportional or first)")
    total_pages = sum(e - s for s, e in ranges) // PAGE
    total_vcpus = sum(vcpus_per_fragment)
    quotas, given = [], 0
    for i, n in enumerate(vcpus_per_fragment):
        share = (
            total_pages - given
            if i == len(vcpus_per_fragment) - 1
            else total_pages * n // total_vcpus
        )
        quotas.append(share)
        given += share
    out: list[HomeRange] = []
    pos = [(s, e) for s, e in ranges]
    index = 0
    for s, e in pos:
        cursor = s
        while cursor < e:
            while index < len(quotas) and quotas[index] == 0:
                index += 1
            take = min(quotas[index] * PAGE, e - cursor)
            out.append(HomeRange(cursor, cursor + take, index))
            quotas[index] -= take // PAGE
            cursor += take
    return out


class HomeMap:
    """Looks up the home fragment of a page id (guest-physical address >> 12)."""

    def __init__(self, homes: list[HomeRange]) -> None:
        self.homes = sorted(homes, key=lambda h: h.start)

    def home(self, page: int) -> int:
        address = page * PAGE
        for h in self.homes:
            if h.start <= address < h.end:
                return h.index
        raise KeyError(f"guest-physical {address:#x} is not coherent memory")
