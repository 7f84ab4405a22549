"""How a guest's memory is shared among its fragments: the one split used by the scheduler
(what each fragment's node must hold), the home plan (which guest pages each fragment is home
for) and `spanvm run --fragments`.

A fragment's share is a whole number of 2 MiB units, in proportion to its vCPUs; the rounding
remainder goes a unit at a time to the lowest-index fragments that have room. Shares are laid
out in fragment order over the guest's RAM as the memory map places it (`vmm.memmap`: up to
3 GiB at 0, the rest above 4 GiB), so the memory a fragment is home for is its share less the
system area below IMAGE_BASE (each fragment's own, never coherent). Pure: no KVM, no ctypes.
"""

from collections.abc import Sequence

from spanvm.vmm.memmap import LARGE_PAGE, ram_ranges

UNIT = LARGE_PAGE  # guest memory is mapped in 2 MiB pages


def memory_shares(
    memory: int, vcpus: Sequence[int], room: Sequence[int] | None = None
) -> list[int] | None:
    """Bytes of guest memory per fragment (summing to `memory`), in proportion to `vcpus`;
    None if they do not fit in `room` (bytes free per fragment; None: no limit)."""
    units = memory // UNIT
    total = sum(vcpus)
    shares = [units * v // total for v in vcpus]
    limit = [units] * len(vcpus) if room is None else [r // UNIT for r in room]
    left = units - sum(shares)
    for i in range(len(shares)):
        grow = min(left, max(0, limit[i] - shares[i]))
        shares[i] += grow
        left -= grow
    if left or any(s > room for s, room in zip(shares, limit, strict=True)):
        return None
    return [s * UNIT for s in shares]


def share_ranges(memory: int, shares: Sequence[int]) -> list[tuple[int, int, int]]:
    """(start, end, fragment) guest-physical ranges of each fragment's share, in address
    order: the shares laid end to end over the guest's RAM."""
    out = []
    bounds, offset = [], 0
    for index, share in enumerate(shares):
        bounds.append((offset, offset + share, index))
        offset += share
    for ram in ram_ranges(memory):
        for first, last, index in bounds:
            lo, hi = max(first, ram.host_offset), min(last, ram.host_offset + ram.size)
            if lo < hi:
                out.append((ram.gpa + lo - ram.host_offset, ram.gpa + hi - ram.host_offset, index))
    return out
