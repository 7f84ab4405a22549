"""The Intel MultiProcessor Specification 1.4 tables: floating pointer + configuration table.

Written from the MP spec 1.4, chapter 4 (section numbers below). Pure Python (struct only).
Linux reads these only when it finds no ACPI MADT (or boots with acpi=off); it scans for
the floating pointer in the first KiB of the EBDA, the last KiB of base memory and
0xF0000-0xFFFFF (section 4), so `base` should be in one of those.

Entries, in the order the spec asks (section 4.3: sorted by entry type):
- a Processor entry (4.3.1) per vCPU of the whole VM in APIC-id order, enabled, the BSP
  flag on APIC id 0; local APIC version 0x14 (integrated APIC, what KVM's LAPIC reports),
  CPU signature family 6, feature flags FPU | APIC (CPUID.1:EDX bits 0 and 9);
- one Bus entry (4.3.2): bus 0, "ISA";
- the I/O APIC entry (4.3.3), version 0x11 (KVM's in-kernel IOAPIC), enabled;
- I/O Interrupt Assignment entries (4.3.4): the 8259's INTR as ExtINT on INTIN0, then every
  ISA IRQ 0-15 on the pin of its GSI (IRQ 0 -> INTIN2 by the shape's override), except an
  IRQ whose own pin another IRQ's override took (IRQ 2, the 8259 cascade): 16 entries with
  the default overrides, the wiring of the spec's default configuration (table 5-2);
- Local Interrupt Assignment entries (4.3.5): LINT0 ExtINT and LINT1 NMI, all local APICs.
The floating pointer's feature byte 2 has IMCRP clear: virtual wire mode, no IMCR (4.1).
"""

import struct

from spanvm.vmm.acpi import checksum
from spanvm.vmm.platform_shape import PlatformShape

ALIGN = 16
SPEC_REVISION = 4  # 1.4
MAX_MP_APIC_ID = 0xFE  # 8-bit ids; 0xFF means "all local APICs" in local assignments
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_SIGNATURE = 0x600  # family 6, model 0, stepping 0 (section 4.3.1, table 4-5)
CPU_FEATURES = (1 << 0) | (1 << 9)  # FPU, APIC
PRODUCT_ID = b"SPANVM VMM"

ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4
CPU_ENABLED = 1
CPU_BOOTSTRAP = 2
IOAPIC_ENABLED = 1
INT_VECTORED = 0  # interrupt types, section 4.3.4 table 4-11
INT_NMI = 1
INT_EXTINT = 3
ISA_BUS_ID = 0
ALL_LOCAL_APICS = 0xFF

_FLOATING = struct.Struct("<4sIBBBB4s")  # section 4.1, 16 bytes
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")  # section 4.2, 44 bytes
_PROCESSOR = struct.Struct("<BBBBII8s")  # 20 bytes
_BUS = struct.Struct("<BB6s")  # 8 bytes
_IOAPIC = struct.Struct("<BBBBI")  # 8 bytes
_INTERRUPT = struct.Struct("<BBHBBBB")  # 8 bytes, I/O and local assignments alike


def build_mptable(shape: PlatformShape, base: int) -> bytes:
    """The MP floating pointer at guest-physical `base`, the configuration table right after.

    Returns the bytes to copy at `base` (16 + 44 + 20 per vCPU + 8 per other entry). base
    must be 16-byte aligned and the table below 4 GiB; every APIC id must fit the MP spec's
    8 bits (at most 0xFE). ValueError otherwise; a VM with larger ids boots from ACPI alone.
    """
    if base % ALIGN or base < 0:
        raise ValueError(f"MP table base {base:#x} is not a 16-byte aligned address")
    if shape.apic_ids[-1] > MAX_MP_APIC_ID:
        raise ValueError(
            f"APIC id {shape.apic_ids[-1]} does not fit an MP table (at most {MAX_MP_APIC_ID})"
        )
    entries = _entries(shape)
    body = b"".join(entries)
    header = bytearray(
        _HEADER.pack(
            b"PCMP",
            _HEADER.size + len(body),
            SPEC_REVISION,
            0,
            shape.oem_id.encode("ascii").ljust(8, b" "),
            PRODUCT_ID.ljust(12, b" "),
            0,
            0,
            len(entries),
            shape.lapic_address,
            0,
            0,
            0,
        )
    )
    table = header + body
    table[7] = checksum(bytes(table))
    if base + _FLOATING.size + len(table) > 1 << 32:
        raise ValueError(f"MP table at {base:#x} would end above 4 GiB")
    floating = bytearray(
        _FLOATING.pack(b"_MP_", base + _FLOATING.size, 1, SPEC_REVISION, 0, 0, b"")
    )
    floating[10] = checksum(bytes(floating))
    return bytes(floating + table)


def _entries(shape: PlatformShape) -> list[bytes]:
    entries: list[bytes] = []
    for apic_id in shape.apic_ids:
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if apic_id == 0 else 0)
        entries.append(
            _PROCESSOR.pack(
                ENTRY_PROCESSOR, apic_id, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES, b""
            )
        )
    entries.append(_BUS.pack(ENTRY_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(
        _IOAPIC.pack(
            ENTRY_IOAPIC, shape.ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, shape.ioapic_address
        )
    )
    flags_of = {o.isa_irq: o.flags for o in shape.overrides}
    assignments = [
        (pin, INT_VECTORED, flags_of.get(irq, 0), irq)
        for irq, pin in shape.isa_ioapic_pins().items()
    ]
    if all(pin != 0 for pin, *_ in assignments):
        assignments.insert(0, (0, INT_EXTINT, 0, 0))
    for pin, kind, flags, irq in assignments:
        entries.append(
            _INTERRUPT.pack(ENTRY_IO_INTERRUPT, kind, flags, ISA_BUS_ID, irq, shape.ioapic_id, pin)
        )
    for kind, lint in ((INT_EXTINT, 0), (INT_NMI, 1)):
        entries.append(
            _INTERRUPT.pack(ENTRY_LOCAL_INTERRUPT, kind, 0, ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint)
        )
    return entries
