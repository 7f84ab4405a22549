"""QEMU's pc-testdev, the parts kvm-unit-tests uses: a 4-byte scratch register at port 0xe0
(any access size, read back), ports 0x2000 + N (N < 24) that set ISA interrupt line N to the
written level, and a 64 KiB RAM-like MMIO buffer at 0xff000000 (the emulator test's MMIO
operands: every access exits to the VMM).

Source: QEMU hw/misc/pc-testdev.c (behaviour only); ../shared/kvm-unit-tests/SPANVM-README.md.
"""

from spanvm.vmm.devices import DeviceHost
from spanvm.vmm.vcpu import Vcpu

SCRATCH_PORT = 0xE0
SCRATCH_SIZE = 4
IRQ_PORT = 0x2000
IRQ_LINES = 24
MMIO_BASE = 0xFF00_0000
MMIO_SIZE = 0x1_0000


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


class TestMmio:
    """0xff000000-0xff00ffff: reads return what was written, at any size and alignment."""

    def __init__(self) -> None:
        self.buffer = bytearray(MMIO_SIZE)

    def read(self, vcpu: Vcpu, offset: int, size: int) -> int:
        return int.from_bytes(self.buffer[offset : offset + size], "little")

    def write(self, vcpu: Vcpu, offset: int, size: int, value: int) -> None:
        self.buffer[offset : offset + size] = value.to_bytes(size, "little")[: MMIO_SIZE - offset]
