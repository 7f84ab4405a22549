"""Guest RAM: one private anonymous host mapping exposed to KVM as one or two memory slots
(where each range sits in the guest: `memmap`)."""

import ctypes

from spanvm.vmm import kvm_abi
from spanvm.vmm.memmap import RamRange, ram_ranges

__all__ = ["GuestMemory", "RamRange"]


class GuestMemory:
    """The guest's RAM, mapped in this process; reads and writes by guest-physical address."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ranges = ram_ranges(size)
        self.host_address = kvm_abi.mmap_anonymous(size)
        self._closed = False
        # Guest-physical [start, end) of every `write`: what the monitor put in guest RAM
        # (a fragment adopts these pages as the guest's initial contents; the rest is zeros).
        self.written: list[tuple[int, int]] = []

    def close(self) -> None:
        """Unmap the RAM (after the VM that used it is gone)."""
        if not self._closed:
            kvm_abi.munmap(self.host_address, self.size)
            self._closed = True

    def host_offset(self, gpa: int, length: int) -> int:
        """Offset into the host mapping of [gpa, gpa+length); ValueError if not all RAM."""
        for r in self.ranges:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r.host_offset + gpa - r.gpa
        raise ValueError(f"guest-physical range {gpa:#x}+{length:#x} is not RAM")

    def gpa_of(self, host_address: int) -> int:
        """Guest-physical address of a host address inside the mapping; ValueError outside."""
        offset = host_address - self.host_address
        for r in self.ranges:
            if r.host_offset <= offset < r.host_offset + r.size:
                return r.gpa + offset - r.host_offset
        raise ValueError(f"host address {host_address:#x} is not guest RAM")

    def write(self, gpa: int, data: bytes) -> None:
        """Copy bytes into guest RAM (without the GIL, as `read`)."""
        offset = self.host_offset(gpa, len(data))
        ctypes.memmove(self.host_address + offset, data, len(data))
        self.written.append((gpa, gpa + len(data)))

    def read(self, gpa: int, length: int) -> bytes:
        """Copy bytes out of guest RAM.

        The copy runs without the GIL (ctypes.memmove, unlike ctypes.string_at, releases it):
        in a fragment a page may be absent and the copy then waits in a userfault until the
        fabric's fault thread brings the page in, exactly like a vCPU's access. Holding the
        GIL there would stop that thread and deadlock the fragment."""
        offset = self.host_offset(gpa, length)
        buffer = ctypes.create_string_buffer(length)
        ctypes.memmove(buffer, self.host_address + offset, length)
        return buffer.raw

    def write_struct(
        self, gpa: int, value: ctypes.Structure | ctypes.Array[ctypes.c_uint64]
    ) -> None:
        """Copy a ctypes structure into guest RAM."""
        self.write(gpa, bytes(value))
