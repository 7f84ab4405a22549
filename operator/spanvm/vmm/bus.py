"""Port-I/O and MMIO buses: exits of KVM_RUN (KVM_EXIT_IO, KVM_EXIT_MMIO) go to the device that
registered the address, as in Firecracker's and kvmtool's device buses.

A device is anything with `read(vcpu, offset, size) -> int` and `write(vcpu, offset, size,
value)`; offsets are from the start of its registered range, sizes in bytes (1, 2, 4, 8). A
device that wants its vCPU thread to end (guest exit, a fatal guest error) raises `VcpuStopError`
after telling the VM why.
"""

import bisect
from dataclasses import dataclass
from typing import Protocol

from spanvm.vmm.vcpu import Vcpu


class VcpuStopError(Exception):
    """Raised by a device: this vCPU's run loop ends (the device already said why)."""


class Device(Protocol):
    """What a bus dispatches to."""

    def read(self, vcpu: Vcpu, offset: int, size: int) -> int: ...

    def write(self, vcpu: Vcpu, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class Mapping:
    """A device's range on a bus: [base, base + size)."""

    base: int
    size: int
    device: Device
    name: str


class BusError(ValueError):
    """Two devices claim overlapping ranges."""


class Bus:
    """Address → device, for one address space (ports or guest-physical MMIO)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._starts: list[int] = []
        self._mappings: list[Mapping] = []

    def register(self, base: int, size: int, device: Device, name: str) -> None:
        """Claim [base, base + size); raises BusError if it overlaps a registered range."""
        i = bisect.bisect_right(self._starts, base)
        before = self._mappings[i - 1] if i else None
        after = self._mappings[i] if i < len(self._mappings) else None
        if (before and before.base + before.size > base) or (after and base + size > after.base):
            other = before if before and before.base + before.size > base else after
            assert other is not None
            raise BusError(
                f"{self.kind} {base:#x}+{size:#x} ({name}) overlaps {other.name} at {other.base:#x}"
            )
        self._starts.insert(i, base)
        self._mappings.insert(i, Mapping(base, size, device, name))

    def find(self, address: int) -> Mapping | None:
        """The mapping that holds `address`, if any."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0:
            m = self._mappings[i]
            if address < m.base + m.size:
                return m
        return None

    def mappings(self) -> tuple[Mapping, ...]:
        return tuple(self._mappings)
