"""QEMU's pc-testdev, the parts kvm-unit-tests' realmode and apic tests use: a 4-byte scratch
register at port 0xe0 (any access size, read back) and ports 0x2000 + N (N < 24) that set ISA
interrupt line N to the written level.

Source: QEMU hw/misc/pc-testdev.c (behaviour only); ../shared/kvm-unit-tests/SPANVM-README.md.
"""

from spanvm.vmm.devices import DeviceHost
from spanvm.vmm.vcpu import Vcpu

SCRATCH_PORT = 0xE0
SCRATCH_SIZE = 4
IRQ_PORT = 0x2000
IRQ_LINES = 24


class TestScratch:
    """Port 0xe0: what was written is read back (per byte lane)."""

    def __init__(self) -> None:
        self.value = 0

    def read(self, vcpu: Vcpu, offset: int, size: int) -> int:
        return (self.value >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, vcpu: Vcpu, offset: int, size: int, value: int) -> None:
        mask = ((1 << (8 * size)) - 1) << (8 * offset)
        self.value = (self.value & ~mask) | ((value << (8 * offset)) & mask)


class TestIrqLines:
    """Ports 0x2000 + N: a write sets ISA IRQ N high (non-zero) or low (zero)."""

    def __init__(self, host: DeviceHost) -> None:
        self.host = host

    def read(self, vcpu: Vcpu, offset: int, size: int) -> int:
        return 0

    def write(self, vcpu: Vcpu, offset: int, size: int, value: int) -> None:
        self.host.set_irq_line(offset, value != 0)
