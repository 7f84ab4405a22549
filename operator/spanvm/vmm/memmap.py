"""The guest-physical memory map every spanvm guest sees: pure constants and ranges.

No KVM, no ctypes: the control plane (API limits, scheduler, home plan) imports this module to
reason about guest memory without loading the VMM.

```
0x0000_0000 - 0x0009_FC00   RAM (conventional memory)               e820 usable
0x0009_FC00 - 0x0010_0000   RAM, reported reserved (EBDA, VGA, BIOS) e820 reserved
   0x000E_0000              ACPI tables (RSDP first, found by Linux's BIOS-area scan)
   0x000F_0000              MP floating pointer and configuration table
0x0010_0000 - min(RAM, 3 GiB)  RAM                                   e820 usable
0xC000_0000 - 0x1_0000_0000  32-bit hole: no RAM
   0xD000_0000              spanvm doorbell (MMIO, 2 MiB)
   0xFEC0_0000              I/O APIC (in-kernel irqchip)
   0xFEE0_0000              local APICs (in-kernel irqchip)
   0xFFFB_D000              KVM's TSS for real-mode emulation (3 pages, KVM_SET_TSS_ADDR)
   0xFFFF_0000              proxy vCPUs' private area (64 KiB; fragments of platform guests)
0x1_0000_0000 - ...          RAM above 3 GiB, if any                   e820 usable
```
E820 types follow the ACPI spec 6.5 §15 (Address Range Types): 1 usable, 2 reserved.
"""

from dataclasses import dataclass
from enum import IntEnum

PAGE = 0x1000
LARGE_PAGE = 0x20_0000
MAX_MEMORY = 64 << 30  # what this VMM maps (identity page tables, slot count)
LOW_RAM_LIMIT = 0xC000_0000
HIGH_RAM_BASE = 0x1_0000_0000

EBDA_START = 0x9_FC00  # the top of conventional memory as a PC BIOS reports it
HIGH_MEMORY_START = 0x10_0000  # 1 MiB: where "extended memory" (mem_upper, bzImage) begins
ACPI_BASE = 0xE_0000
ACPI_LIMIT = 0xF_0000
MPTABLE_BASE = 0xF_0000
MPTABLE_LIMIT = 0x10_0000

DOORBELL_BASE = 0xD000_0000
DOORBELL_SIZE = LARGE_PAGE
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000
KVM_TSS_ADDR = 0xFFFB_D000
PROXY_AREA = 0xFFFF_0000  # vmm/proxy.py: ends at 4 GiB, so it holds the reset vector
PROXY_AREA_SIZE = 0x1_0000


class E820Type(IntEnum):
    """Address range types (ACPI 6.5 §15.1, Table 15.312)."""

    RAM = 1
    RESERVED = 2


@dataclass(frozen=True)
class RamRange:
    """A contiguous run of guest RAM: where it is in the guest (bytes) and at which offset of
    the VMM's single host mapping it lives."""

    gpa: int
    size: int
    host_offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class E820Entry:
    """One entry of the BIOS memory map (INT 15h E820): [start, start + size), its type."""

    start: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.start + self.size


def align_up(value: int, alignment: int) -> int:
    """`value` rounded up to a multiple of `alignment` (bytes; any positive alignment)."""
    return (value + alignment - 1) // alignment * alignment


def ram_ranges(size: int) -> tuple[RamRange, ...]:
    """Guest-physical ranges of `size` bytes of RAM: up to 3 GiB at 0, the rest at 4 GiB."""
    low = min(size, LOW_RAM_LIMIT)
    ranges = [RamRange(0, low, 0)]
    if size > low:
        ranges.append(RamRange(HIGH_RAM_BASE, size - low, low))
    return tuple(ranges)


def e820_map(size: int) -> tuple[E820Entry, ...]:
    """The E820 map of a guest with `size` bytes of RAM (a multiple of 2 MiB, at least 2 MiB),
    in address order: conventional memory, the reserved BIOS area that holds the firmware
    tables, extended memory up to 3 GiB and RAM above 4 GiB. Raises ValueError below 2 MiB."""
    if size < LARGE_PAGE:
        raise ValueError(f"guest memory of {size} bytes is below the 2 MiB minimum")
    entries = [
        E820Entry(0, EBDA_START, E820Type.RAM),
        E820Entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820Type.RESERVED),
    ]
    for ram in ram_ranges(size):
        start = max(ram.gpa, HIGH_MEMORY_START)
        entries.append(E820Entry(start, ram.end - start, E820Type.RAM))
    return tuple(entries)
