"""The VM as its firmware tables describe it: NUMA nodes, interrupt controllers, overrides.

Pure data (no ctypes, no KVM), shared by `acpi.py` (ACPI 6.x tables) and `mptable.py` (Intel
MultiProcessor Specification 1.4). Each fragment of a spanning VM is one NUMA node of the guest:
its proximity domain is the fragment index, its processors are the fragment's vCPUs (APIC id =
vCPU id) and its memory is the fragment's home guest-physical ranges.

Interrupt wiring is that of a PC with KVM's in-kernel irqchip (PIC + IOAPIC) and PIT, as QEMU
presents it: one IOAPIC with 24 pins at GSI 0, the ISA timer IRQ 0 on pin 2 (MP spec 1.4
table 5-2), and the ACPI SCI on IRQ 9, level triggered, active high (ACPI 6.5 section
5.2.12.5). KVM's default GSI routing sends GSI n to IOAPIC pin n, and its in-kernel PIT
raises GSI 0: with the default overrides the VMM must install a routing (KVM_SET_GSI_ROUTING)
that sends GSI 0 to IOAPIC pin 2 (and PIC pin 0), as QEMU's kvm_pc_setup_irq_routing does.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from spanvm.vmm.memmap import IOAPIC_BASE as IOAPIC_ADDRESS
from spanvm.vmm.memmap import LAPIC_BASE as LAPIC_ADDRESS

IOAPIC_PINS = 24
ISA_IRQS = 16
OEM_ID = "SPANVM"

# MPS INTI flags (ACPI 6.5 table 5.50; MP spec 1.4 table 4-10): polarity in bits 1:0,
# trigger mode in bits 3:2; 0 in either field means "conforms to the bus" (ISA: high, edge).
INTI_CONFORMS = 0x0
INTI_ACTIVE_HIGH = 0x1
INTI_ACTIVE_LOW = 0x3
INTI_EDGE = 0x1 << 2
INTI_LEVEL = 0x3 << 2

MAX_APIC_ID = 0xFFFF_FFFE  # x2APIC ids are 32-bit; 0xFFFFFFFF is the broadcast id


@dataclass(frozen=True)
class NumaNode:
    """One fragment as a NUMA node.

    proximity_domain: the fragment index (ACPI 6.5 section 5.2.16: a 32-bit domain number).
    apic_ids: the APIC ids of its vCPUs, which are the vCPU ids.
    memory: its home RAM as [start, end) guest-physical byte ranges, start < end.
    """

    proximity_domain: int
    apic_ids: tuple[int, ...]
    memory: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class InterruptOverride:
    """An ISA IRQ that reaches the IOAPIC on another GSI or with non-ISA polarity/trigger.

    ACPI 6.5 section 5.2.12.5 (Interrupt Source Override); `flags` are MPS INTI flags.
    """

    isa_irq: int
    gsi: int
    flags: int


DEFAULT_OVERRIDES = (
    InterruptOverride(isa_irq=0, gsi=2, flags=INTI_CONFORMS),  # PIT on IOAPIC pin 2
    InterruptOverride(isa_irq=9, gsi=9, flags=INTI_LEVEL | INTI_ACTIVE_HIGH),  # ACPI SCI
)


@dataclass(frozen=True)
class PlatformShape:
    """What the ACPI and MP tables describe about one VM (the whole VM, every fragment).

    nodes: one per fragment, in any order; proximity domains are 0..len(nodes)-1 (the
        fragment indexes), APIC ids unique, memory ranges non-overlapping across all nodes.
        APIC id 0 (the bootstrap processor) must exist.
    ioapic_id / ioapic_address / ioapic_gsi_base / ioapic_pins: the single IOAPIC. Id 0 is
        the reset value of KVM's in-kernel IOAPIC id register (QEMU declares 0 too); IOAPIC
        ids are a namespace apart from CPU APIC ids on xAPIC/x2APIC systems.
    lapic_address: the local APIC MMIO base every processor sees.
    overrides: ISA IRQ -> GSI overrides (MADT type 2; the MP table's ISA assignments).
    sci_irq: the FADT SCI_INT; an override must say it is level/active high.
    cmos_rtc: whether the VMM emulates the CMOS RTC at ports 0x70/0x71 (FADT IAPC_BOOT_ARCH).
    pm1_port: None, or the first of 6 I/O ports where the VMM emulates the ACPI PM1 register
        block (ACPI 6.5 section 4.8, fixed hardware registers): PM1a status (u16) at pm1_port,
        PM1a enable (u16) at +2, PM1a control (u16) at +4 (SCI_EN, bit 0, reading 1). The
        FADT declares them when set; without them ACPICA cannot initialise fixed events, so
        the ACPI interpreter does not start (the MADT, SRAT and SLIT are used before and
        regardless). See acpi._fadt.
    oem_id: the 6-character OEM id of every ACPI table and the MP table.

    Raises ValueError from construction if any of the above does not hold.
    """

    nodes: tuple[NumaNode, ...]
    ioapic_id: int = 0
    ioapic_address: int = IOAPIC_ADDRESS
    ioapic_gsi_base: int = 0
    ioapic_pins: int = IOAPIC_PINS
    lapic_address: int = LAPIC_ADDRESS
    overrides: tuple[InterruptOverride, ...] = field(default=DEFAULT_OVERRIDES)
    sci_irq: int = 9
    cmos_rtc: bool = False
    pm1_port: int | None = None
    oem_id: str = OEM_ID

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def apic_ids(self) -> tuple[int, ...]:
        """Every vCPU's APIC id across the whole VM, ascending."""
        return tuple(sorted(a for node in self.nodes for a in node.apic_ids))

    def node_of(self, apic_id: int) -> NumaNode:
        """The node holding `apic_id`; KeyError if none does."""
        for node in self.nodes:
            if apic_id in node.apic_ids:
                return node
        raise KeyError(f"APIC id {apic_id} is in no NUMA node")

    def gsi_of(self, isa_irq: int) -> int:
        """The GSI an ISA IRQ (0-15) arrives on: its override, else the identity mapping."""
        for override in self.overrides:
            if override.isa_irq == isa_irq:
                return override.gsi
        return self.ioapic_gsi_base + isa_irq

    def isa_ioapic_pins(self) -> dict[int, int]:
        """ISA IRQ -> the IOAPIC pin it arrives on, for every ISA IRQ that reaches the IOAPIC:
        an IRQ whose identity pin another IRQ's override took (IRQ 2: the PIT's IRQ 0 is on
        pin 2) has none. What the MP table's I/O interrupt entries and the VMM's GSI routing
        both follow."""
        overridden = {o.isa_irq for o in self.overrides}
        taken = {o.gsi for o in self.overrides if o.gsi != o.isa_irq + self.ioapic_gsi_base}
        return {
            irq: self.gsi_of(irq) - self.ioapic_gsi_base
            for irq in range(ISA_IRQS)
            if irq in overridden or self.gsi_of(irq) not in taken
        }


def shape_for_fragments(
    vcpus: Sequence[int], memory: Sequence[Sequence[tuple[int, int]]]
) -> PlatformShape:
    """The shape of a VM whose fragment i has vcpus[i] vCPUs and home ranges memory[i].

    vCPU ids (= APIC ids) are numbered consecutively from 0 in fragment order; fragment i is
    proximity domain i. Ranges are [start, end) guest-physical bytes. ValueError if the two
    sequences differ in length, a fragment has no vCPU, or the shape is invalid.
    """
    if len(vcpus) != len(memory):
        raise ValueError(f"{len(vcpus)} vCPU counts but {len(memory)} memory range lists")
    nodes = []
    first = 0
    for index, (count, ranges) in enumerate(zip(vcpus, memory, strict=True)):
        if count < 1:
            raise ValueError(f"fragment {index} has {count} vCPUs; each needs at least one")
        apic_ids = tuple(range(first, first + count))
        nodes.append(NumaNode(index, apic_ids, tuple((s, e) for s, e in ranges)))
        first += count
    return PlatformShape(nodes=tuple(nodes))


def _validate(shape: PlatformShape) -> None:
    if not shape.nodes:
        raise ValueError("a platform needs at least one NUMA node")
    domains = sorted(node.proximity_domain for node in shape.nodes)
    if domains != list(range(len(shape.nodes))):
        # The SLIT indexes its matrix by proximity domain (ACPI 6.5 section 5.2.17).
        raise ValueError(f"proximity domains must be 0..{len(shape.nodes) - 1}, got {domains}")
    ids = [a for node in shape.nodes for a in node.apic_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("an APIC id appears twice")
    if any(not 0 <= a <= MAX_APIC_ID for a in ids):
        raise ValueError(f"APIC ids must be in 0..{MAX_APIC_ID:#x}")
    if 0 not in ids:
        raise ValueError("APIC id 0 (the bootstrap processor) is missing")
    ranges = sorted(r for node in shape.nodes for r in node.memory)
    for start, end in ranges:
        if not 0 <= start < end <= 1 << 64:
            raise ValueError(f"memory range [{start:#x}, {end:#x}) is empty or out of range")
    for (_, previous_end), (start, _) in pairwise(ranges):
        if start < previous_end:
            raise ValueError(f"memory ranges overlap at {start:#x}")
    if len(shape.oem_id) > 6 or not shape.oem_id.isascii():
        raise ValueError(f"OEM id {shape.oem_id!r} is not at most 6 ASCII characters")
    if not 1 <= shape.ioapic_pins <= 240 or not 0 <= shape.ioapic_id <= 0xFF:
        raise ValueError("IOAPIC needs 1-240 pins and an 8-bit id")
    for o in shape.overrides:
        pins = range(shape.ioapic_gsi_base, shape.ioapic_gsi_base + shape.ioapic_pins)
        if not 0 <= o.isa_irq < ISA_IRQS or o.gsi not in pins or not 0 <= o.flags <= 0xF:
            raise ValueError(f"override {o} is not an ISA IRQ onto an IOAPIC pin")
    if len({o.isa_irq for o in shape.overrides}) != len(shape.overrides):
        raise ValueError("two overrides for one ISA IRQ")
    if shape.pm1_port is not None and not 0 < shape.pm1_port <= 0xFFFF - 6:
        raise ValueError(f"PM1 block port {shape.pm1_port:#x} is not an I/O port range")
    if not 0 <= shape.sci_irq < ISA_IRQS:
        raise ValueError(f"SCI IRQ {shape.sci_irq} is not an ISA IRQ")
