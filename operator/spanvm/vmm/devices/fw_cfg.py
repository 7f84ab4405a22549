"""A minimal QEMU firmware configuration device (legacy port I/O only, no DMA): a 16-bit
selector written at 0x510 chooses an item, whose bytes are then read one at a time at 0x511.

Source: QEMU docs/specs/fw_cfg.rst ("Selector Register", "Data Register", the legacy keys);
kvm-unit-tests lib/x86/fwcfg.c reads FW_CFG_NB_CPUS (0x05) at boot, FW_CFG_RAM_SIZE (0x03)
and FW_CFG_MAX_RAM (0x11). Unknown keys read as zeros, as on QEMU.
"""

import struct

from spanvm.vmm.vcpu import Vcpu

PORT = 0x510
SIZE = 2  # 0x510 selector, 0x511 data
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_MAX_RAM = 0x11


def standard_items(ram_size: int, vcpu_count: int) -> dict[int, bytes]:
    """The items a guest of `ram_size` bytes and `vcpu_count` vCPUs is given (little endian)."""
    return {
        FW_CFG_SIGNATURE: b"QEMU",
        FW_CFG_ID: struct.pack("<I", 1),  # bit 0: traditional interface; no DMA
        FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
        FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
        FW_CFG_NB_CPUS: struct.pack("<H", vcpu_count),
        FW_CFG_MAX_CPUS: struct.pack("<H", vcpu_count),
        FW_CFG_MAX_RAM: struct.pack("<Q", 0),  # no limit
    }


class FwCfg:
    """The selector/data pair. Items are fixed at construction."""

    def __init__(self, items: dict[int, bytes]) -> None:
        self.items = dict(items)
        self._selected = b""
        self._position = 0

    def read(self, vcpu: Vcpu, offset: int, size: int) -> int:
        if offset != 1:
            return 0
        value = 0
        for i in range(size):  # the data register is byte-wide; wider reads repeat it
            byte = self._selected[self._position] if self._position < len(self._selected) else 0
            self._position += 1
            value |= byte << (8 * i)
        return value

    def write(self, vcpu: Vcpu, offset: int, size: int, value: int) -> None:
        if offset == 0:
            # bit 14 (write channel) is ignored; arch-local keys (bit 15) are none of ours
            self._selected = self.items.get(value & 0xBFFF, b"")
            self._position = 0
