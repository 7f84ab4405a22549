"""ACPI tables for a spanning VM: RSDP, XSDT, FADT, DSDT, MADT, SRAT and SLIT as one blob.

Written from the ACPI Specification 6.5 (section numbers below are that edition's). Pure
Python (struct only): the VMM copies `AcpiTables.blob` to guest-physical `base`.

Layout of the blob (every table 16-byte aligned, in this order, no gaps beyond padding):
RSDP (at `base`, so the legacy scan of 0xE0000-0xFFFFF on 16-byte boundaries that Linux
does, ACPI 6.5 section 5.2.5.1, finds it), XSDT, FACP (FADT), DSDT, APIC (MADT), SRAT, SLIT.

Every table carries the shape's OEM id, an OEM table id of the OEM id's first 4 characters
plus the table signature, OEM revision 1, creator id "SPVM" and creator revision 1.
"""

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from spanvm.vmm.memmap import align_up
from spanvm.vmm.platform_shape import (
    INTI_ACTIVE_HIGH,
    INTI_EDGE,
    PlatformShape,
)

ALIGN = 16
CREATOR_ID = b"SPVM"
CREATOR_REVISION = 1
OEM_REVISION = 1

# Revisions of the tables as ACPI 6.5 defines them.
RSDP_REVISION = 2
XSDT_REVISION = 1
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
DSDT_REVISION = 2  # 2: AML integers are 64-bit (ACPI 6.5 section 5.2.11.1)
MADT_REVISION = 5
SRAT_REVISION = 3
SLIT_REVISION = 1

# SLIT distances (ACPI 6.5 section 5.2.17): 10 is the normalised local distance; 20 says a
# remote fragment's memory costs twice as much, the value QEMU and most two-socket firmware
# use. A fragment's remote memory actually goes over the memory fabric, which is far slower;
# the ratio only needs to make Linux prefer local memory, which any value > 10 does.
LOCAL_DISTANCE = 10
REMOTE_DISTANCE = 20

X2APIC_FIRST = 0xFF  # xAPIC id 0xFF is the broadcast id: ids >= 255 need x2APIC entries
ALL_PROCESSORS_UID = 0xFF
ALL_PROCESSORS_X2UID = 0xFFFF_FFFF
NMI_LINT = 1

_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # ACPI 6.5 section 5.2.6, 36 bytes
_RSDP = struct.Struct("<8sB6sBIIQB3s")  # section 5.2.5.3, 36 bytes
FADT_LENGTH = 276  # section 5.2.9, table 5.9 (ACPI 6.0 and later)

# MADT structure types (section 5.2.12, table 5.21)
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_LOCAL_X2APIC = 9
MADT_LOCAL_X2APIC_NMI = 0xA
MADT_PCAT_COMPAT = 1  # MADT flags: the 8259 pair is present (KVM's in-kernel PIC)
LAPIC_ENABLED = 1

# SRAT structure types (section 5.2.16)
SRAT_PROCESSOR_APIC = 0
SRAT_MEMORY = 1
SRAT_PROCESSOR_X2APIC = 2
SRAT_ENABLED = 1

# FADT flags (section 5.2.9, table 5.10) and IA-PC boot architecture flags (table 5.11)
FADT_WBINVD = 1 << 0
FADT_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_8042 = 1 << 1
BOOT_VGA_NOT_PRESENT = 1 << 2
BOOT_CMOS_RTC_NOT_PRESENT = 1 << 5
PM1_EVENT_LENGTH = 4  # PM1 status + enable, 16 bits each (section 4.8)
PM1_CONTROL_LENGTH = 2
GAS_SYSTEM_IO = 1  # Generic Address Structure (section 5.2.3.2): space id, bit width,
_GAS = "<BBBBQ"  # bit offset, access size (0: legacy/undefined), address
P_LVL2_NOT_SUPPORTED = 101  # > 100 us: C2 not supported (table 5.9)
P_LVL3_NOT_SUPPORTED = 1001  # > 1000 us: C3 not supported


@dataclass(frozen=True)
class AcpiTables:
    """The tables as one blob to copy at guest-physical `base`.

    rsdp_address: guest-physical address of the RSDP (= base); what a Linux boot protocol
        loader may also put in boot_params.acpi_rsdp_addr.
    blob: the bytes, len(blob) is the guest memory they occupy from base.
    addresses: table signature ("RSD PTR ", "XSDT", "FACP", "DSDT", "APIC", "SRAT", "SLIT")
        -> guest-physical address.
    """

    rsdp_address: int
    blob: bytes
    addresses: Mapping[str, int]


def build_acpi(shape: PlatformShape, base: int) -> AcpiTables:
    """The ACPI tables describing `shape`, laid out from guest-physical byte address `base`.

    base must be 16-byte aligned (the RSDP is found on 16-byte boundaries) and the blob must
    end below 4 GiB (the FADT's 32-bit DSDT field); ValueError otherwise. Legacy scanning
    only finds the RSDP if base is in 0xE0000-0xFFFFF (or the EBDA's first KiB).
    """
    if base % ALIGN or base < 0:
        raise ValueError(f"ACPI base {base:#x} is not a 16-byte aligned address")
    dsdt = _dsdt(shape)
    madt = _madt(shape)
    srat = _srat(shape)
    slit = _slit(shape)
    xsdt_length = _HEADER.size + 8 * 4  # FADT, MADT, SRAT, SLIT
    layout: dict[str, int] = {}
    cursor = base
    for signature, length in (
        ("RSD PTR ", _RSDP.size),
        ("XSDT", xsdt_length),
        ("FACP", FADT_LENGTH),
        ("DSDT", len(dsdt)),
        ("APIC", len(madt)),
        ("SRAT", len(srat)),
        ("SLIT", len(slit)),
    ):
        layout[signature] = cursor
        cursor = align_up(cursor + length, ALIGN)
    if cursor > 1 << 32:
        raise ValueError(f"ACPI tables from {base:#x} would end above 4 GiB")
    fadt = _fadt(shape, layout["DSDT"])
    xsdt = _xsdt(shape, [layout[s] for s in ("FACP", "APIC", "SRAT", "SLIT")])
    rsdp = _rsdp(shape, layout["XSDT"])
    blob = bytearray(cursor - base)
    for signature, table in (
        ("RSD PTR ", rsdp),
        ("XSDT", xsdt),
        ("FACP", fadt),
        ("DSDT", dsdt),
        ("APIC", madt),
        ("SRAT", srat),
        ("SLIT", slit),
    ):
        offset = layout[signature] - base
        blob[offset : offset + len(table)] = table
    return AcpiTables(rsdp_address=base, blob=bytes(blob), addresses=layout)


def checksum(data: bytes) -> int:
    """The byte that makes `data` plus itself sum to 0 mod 256 (ACPI 6.5 section 5.2.6)."""
    return -sum(data) & 0xFF


def _oem(shape: PlatformShape) -> bytes:
    return shape.oem_id.encode("ascii").ljust(6, b" ")


def _table(shape: PlatformShape, signature: bytes, revision: int, body: bytes) -> bytes:
    """System description table header (section 5.2.6) + body, with length and checksum."""
    oem_table_id = _oem(shape)[:4] + signature
    header = _HEADER.pack(
        signature,
        _HEADER.size + len(body),
        revision,
        0,
        _oem(shape),
        oem_table_id,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    table = bytearray(header + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


def _rsdp(shape: PlatformShape, xsdt_address: int) -> bytes:
    """Root System Description Pointer, revision 2 (section 5.2.5.3).

    The RsdtAddress is 0: there is no RSDT, only the XSDT (an OS that understands revision 2
    uses the XSDT; Linux does unless booted with acpi=rsdt). Checksum covers the first 20
    bytes (the ACPI 1.0 part), the extended checksum all 36.
    """
    raw = bytearray(
        _RSDP.pack(b"RSD PTR ", 0, _oem(shape), RSDP_REVISION, 0, _RSDP.size, xsdt_address, 0, b"")
    )
    raw[8] = checksum(bytes(raw[:20]))
    raw[32] = checksum(bytes(raw))
    return bytes(raw)


def _xsdt(shape: PlatformShape, addresses: list[int]) -> bytes:
    """Extended System Description Table (section 5.2.8): 64-bit addresses of the tables."""
    body = b"".join(struct.pack("<Q", address) for address in addresses)
    return _table(shape, b"XSDT", XSDT_REVISION, body)


def _fadt(shape: PlatformShape, dsdt_address: int) -> bytes:
    """Fixed ACPI Description Table, revision 6.5 layout (section 5.2.9, table 5.9).

    Not hardware-reduced (Flags bit 20 clear): with that bit Linux assumes no legacy PC
    hardware and would not use the PIT and the 8259. What is set:
    - DSDT and X_DSDT: both the DSDT's address (equal, so ACPICA sees no 32/64 mismatch).
    - SCI_INT: shape.sci_irq (9), declared level/active-high by a MADT override.
    - P_LVL2_LAT 101 / P_LVL3_LAT 1001: the spec's "C2/C3 not supported" values.
    - IAPC_BOOT_ARCH: LEGACY_DEVICES (the PIT, PIC and UART are ISA devices), 8042 clear
      (no keyboard controller: Linux's i8042 driver does not probe), VGA Not Present (Linux
      does not poke VGA ports), CMOS RTC Not Present unless shape.cmos_rtc (Linux then does
      not register the rtc_cmos platform device).
    - Flags: WBINVD (the spec requires it of every processor with WBINVD), PWR_BUTTON and
      SLP_BUTTON (no fixed-feature buttons, there is no PM1 block to report them).
    - PM1a_EVT_BLK (4 bytes) and PM1a_CNT_BLK (2 bytes), 32-bit and X_ (SystemIO) forms,
      only if shape.pm1_port is set (the VMM then emulates those ports).
    What is left zero, and what Linux (ACPICA 20200925, checked with acpiexec) makes of it:
    - FIRMWARE_CTRL / X_FIRMWARE_CTRL: no FACS, so no ACPI global lock and no waking vector
      (no S3 resume).
    - SMI_CMD, ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT, CST_CNT: no SMM, so no
      legacy-to-ACPI mode hand-off; ACPICA takes the machine as always in ACPI mode.
    - PM1a event and control blocks when shape.pm1_port is None: ACPICA logs "Firmware
      Error: Required FADT field Pm1aEventBlock/Pm1aControlBlock has zero address", then
      cannot enable the subsystem (fixed events: AE_BAD_ADDRESS), so the guest runs without
      the ACPI interpreter (no namespace, no _INI). Linux parses the MADT, SRAT and SLIT
      earlier, at table-init time, without the interpreter, so SMP and NUMA are unaffected.
      (Checked with ACPICA's acpiexec, not yet with a Linux guest.)
    - PM1b blocks, PM2 control, PM timer, GPE0/GPE1 blocks (32-bit and X_ forms) and their
      lengths: optional; no GPEs, no sleep states, no ACPI power-off, no ACPI PM timer
      clocksource.
    - FLUSH_SIZE/STRIDE: unused because WBINVD is set. DUTY_OFFSET/WIDTH: no throttling.
    - DAY_ALRM, MON_ALRM, CENTURY: no RTC alarm day/month, no century register.
    - RESET_REG/RESET_VALUE (RESET_REG_SUP clear): reboot=acpi is unavailable; Linux's
      other reboot methods apply.
    - Preferred_PM_Profile 0 (unspecified), ARM_BOOT_ARCH, SLEEP_CONTROL/STATUS_REG,
      Hypervisor Vendor Identity: unused on x86 or optional.
    """
    body = bytearray(FADT_LENGTH - _HEADER.size)

    def put(fmt: str, offset: int, value: int) -> None:
        struct.pack_into(fmt, body, offset - _HEADER.size, value)

    put("<I", 40, dsdt_address)  # DSDT
    put("<H", 46, shape.sci_irq)  # SCI_INT
    put("<H", 96, P_LVL2_NOT_SUPPORTED)
    put("<H", 98, P_LVL3_NOT_SUPPORTED)
    boot_arch = BOOT_LEGACY_DEVICES | BOOT_VGA_NOT_PRESENT
    if not shape.cmos_rtc:
        boot_arch |= BOOT_CMOS_RTC_NOT_PRESENT
    put("<H", 109, boot_arch)  # IAPC_BOOT_ARCH
    put("<I", 112, FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON)  # Flags
    put("<B", 131, FADT_MINOR_REVISION)  # FADT Minor Version
    put("<Q", 140, dsdt_address)  # X_DSDT
    if shape.pm1_port is not None:
        event, control = shape.pm1_port, shape.pm1_port + PM1_EVENT_LENGTH
        put("<I", 56, event)  # PM1a_EVT_BLK
        put("<I", 64, control)  # PM1a_CNT_BLK
        put("<B", 88, PM1_EVENT_LENGTH)  # PM1_EVT_LEN
        put("<B", 89, PM1_CONTROL_LENGTH)  # PM1_CNT_LEN
        struct.pack_into(
            _GAS, body, 148 - _HEADER.size, GAS_SYSTEM_IO, 8 * PM1_EVENT_LENGTH, 0, 0, event
        )
        struct.pack_into(
            _GAS, body, 172 - _HEADER.size, GAS_SYSTEM_IO, 8 * PM1_CONTROL_LENGTH, 0, 0, control
        )
    return _table(shape, b"FACP", FADT_REVISION, bytes(body))


def _dsdt(shape: PlatformShape) -> bytes:
    """Differentiated System Description Table (section 5.2.11.1): the header alone.

    An empty AML definition block is valid: the namespace holds only the predefined scopes
    (\\_SB, \\_GPE, ...). No processor devices (Linux enumerates CPUs from the MADT; without
    ACPI0007 devices its ACPI processor driver, i.e. ACPI cpuidle/cpufreq, does not bind),
    no \\_S5 (no ACPI power-off, see the FADT), no PCI root bridge.
    """
    return _table(shape, b"DSDT", DSDT_REVISION, b"")


def _madt(shape: PlatformShape) -> bytes:
    """Multiple APIC Description Table (section 5.2.12).

    Body: local APIC address, flags (PCAT_COMPAT), then
    - one Processor Local APIC (5.2.12.2, type 0) per vCPU with APIC id < 255, or Local
      x2APIC (5.2.12.12, type 9) for ids >= 255, every vCPU of the whole VM, in APIC-id
      order, enabled; ACPI processor UID = APIC id;
    - the I/O APIC (5.2.12.3, type 1);
    - one Interrupt Source Override (5.2.12.5, type 2) per shape override (bus 0 = ISA);
    - Local APIC NMI (5.2.12.7, type 4) on LINT1 of all processors (UID 0xFF), and the
      Local x2APIC NMI (5.2.12.13, type 10, UID 0xFFFFFFFF) too if there are x2APIC entries.
    """
    entries = [struct.pack("<II", shape.lapic_address, MADT_PCAT_COMPAT)]
    for apic_id in shape.apic_ids:
        if apic_id < X2APIC_FIRST:
            entries.append(struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, apic_id, apic_id, 1))
        else:
            entries.append(
                struct.pack("<BBHIII", MADT_LOCAL_X2APIC, 16, 0, apic_id, LAPIC_ENABLED, apic_id)
            )
    entries.append(
        struct.pack(
            "<BBBBII",
            MADT_IO_APIC,
            12,
            shape.ioapic_id,
            0,
            shape.ioapic_address,
            shape.ioapic_gsi_base,
        )
    )
    for o in shape.overrides:
        entries.append(
            struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, o.isa_irq, o.gsi, o.flags)
        )
    nmi_flags = INTI_ACTIVE_HIGH | INTI_EDGE
    entries.append(
        struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS_UID, nmi_flags, NMI_LINT)
    )
    if shape.apic_ids[-1] >= X2APIC_FIRST:
        entries.append(
            struct.pack(
                "<BBHIB3s",
                MADT_LOCAL_X2APIC_NMI,
                12,
                nmi_flags,
                ALL_PROCESSORS_X2UID,
                NMI_LINT,
                b"",
            )
        )
    return _table(shape, b"APIC", MADT_REVISION, b"".join(entries))


def _srat(shape: PlatformShape) -> bytes:
    """System Resource Affinity Table (section 5.2.16).

    Body: reserved u32 = 1 (required for backward compatibility), reserved u64, then one
    processor affinity per vCPU in APIC-id order (Processor Local APIC/SAPIC Affinity,
    5.2.16.1, for ids < 255; Processor Local x2APIC Affinity, 5.2.16.3, otherwise) with its
    node's proximity domain, enabled, clock domain 0; then one Memory Affinity (5.2.16.2)
    per home range, ascending, enabled, neither hot-pluggable nor non-volatile.
    """
    entries = [struct.pack("<IQ", 1, 0)]
    for apic_id in shape.apic_ids:
        domain = shape.node_of(apic_id).proximity_domain
        if apic_id < X2APIC_FIRST:
            entries.append(
                struct.pack(
                    "<BBBBIB3sI",
                    SRAT_PROCESSOR_APIC,
                    16,
                    domain & 0xFF,
                    apic_id,
                    SRAT_ENABLED,
                    0,
                    (domain >> 8).to_bytes(3, "little"),
                    0,
                )
            )
        else:
            entries.append(
                struct.pack(
                    "<BBHIIIII", SRAT_PROCESSOR_X2APIC, 24, 0, domain, apic_id, SRAT_ENABLED, 0, 0
                )
            )
    ranges = sorted((r, node.proximity_domain) for node in shape.nodes for r in node.memory)
    for (start, end), domain in ranges:
        entries.append(
            struct.pack("<BBIHQQIIQ", SRAT_MEMORY, 40, domain, 0, start, end - start, 0, 1, 0)
        )
    return _table(shape, b"SRAT", SRAT_REVISION, b"".join(entries))


def _slit(shape: PlatformShape) -> bytes:
    """System Locality Information Table (section 5.2.17).

    Body: number of localities (u64, = number of nodes), then the row-major matrix of
    one-byte distances, entry [i][j] from proximity domain i to j: LOCAL_DISTANCE on the
    diagonal, REMOTE_DISTANCE elsewhere.
    """
    count = len(shape.nodes)
    matrix = bytes(
        LOCAL_DISTANCE if i == j else REMOTE_DISTANCE for i in range(count) for j in range(count)
    )
    return _table(shape, b"SLIT", SLIT_REVISION, struct.pack("<Q", count) + matrix)
