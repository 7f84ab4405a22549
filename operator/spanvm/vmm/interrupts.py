"""Interrupts that cross fragments: what one is, and how it is delivered to a local vCPU.

An `Interrupt` is what a local APIC accepted for a vCPU run elsewhere (caught by that vCPU's
proxy here, see `proxy.py`) and what the fragment running the vCPU delivers to it. Delivery
is an MSI write through KVM_SIGNAL_MSI to the vCPU's APIC id, physical destination, so the
in-kernel LAPIC of the destination accepts it exactly as if a local vCPU had sent the IPI:
a fixed interrupt lands in its IRR, an NMI, INIT or start-up IPI changes its state.

Encoding: Intel SDM vol. 3A §11.11.1 (MSI address: 0xFEE in bits 31:20, destination APIC id
in 19:12, destination mode in bit 2) and §11.11.2 (MSI data: vector in 7:0, delivery mode in
10:8, level in bit 14, trigger mode in bit 15). The start-up delivery mode (110b), reserved
for MSIs on hardware, is accepted by KVM's LAPIC as it is from an ICR write
(arch/x86/kvm/lapic.c, __apic_accept_irq).
"""

import enum
from dataclasses import dataclass

MSI_ADDRESS_BASE = 0xFEE0_0000
MSI_LEVEL_ASSERT = 1 << 14


class DeliveryMode(enum.IntEnum):
    """ICR/MSI delivery modes (SDM vol. 3A §11.6.1) that cross fragments."""

    FIXED = 0
    NMI = 4
    INIT = 5
    STARTUP = 6


@dataclass(frozen=True)
class Interrupt:
    """One interrupt for one vCPU: a delivery mode and, for FIXED and STARTUP, a vector."""

    mode: DeliveryMode
    vector: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.vector <= 0xFF:
            raise ValueError(f"interrupt vector must be 0-255, got {self.vector}")

    def __str__(self) -> str:
        if self.mode in (DeliveryMode.FIXED, DeliveryMode.STARTUP):
            return f"{self.mode.name} {self.vector:#04x}"
        return self.mode.name

    def encode(self) -> int:
        """Two bytes for the wire: delivery mode, vector."""
        return self.mode << 8 | self.vector

    @classmethod
    def decode(cls, value: int) -> "Interrupt":
        """The inverse of `encode`; ValueError for a delivery mode that does not cross."""
        return cls(DeliveryMode(value >> 8 & 0x7), value & 0xFF)


def msi(apic_id: int, interrupt: Interrupt) -> tuple[int, int]:
    """(address, data) of the MSI that delivers `interrupt` to APIC id `apic_id` (physical
    destination, edge; INIT asserted). ValueError for an id an xAPIC MSI cannot name."""
    if not 0 <= apic_id < 0xFF:
        raise ValueError(f"APIC id {apic_id} is outside 0-254 (the MSI destination field)")
    data = interrupt.mode << 8 | interrupt.vector
    if interrupt.mode == DeliveryMode.INIT:
        data |= MSI_LEVEL_ASSERT
    return MSI_ADDRESS_BASE | apic_id << 12, data
