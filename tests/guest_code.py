"""Tiny hand-assembled flat guest binaries for testing the monitor's error paths."""

import struct

from spanvm.vmm.layout import MMIO_BASE, Doorbell


def store_to(address: int, value: int) -> bytes:
    """movabs rax, address; mov qword [rax], value (sign-extended imm32)."""
    return b"\x48\xb8" + struct.pack("<Q", address) + b"\x48\xc7\x00" + struct.pack("<i", value)


def load_from(address: int) -> bytes:
    """movabs rax, address; mov rbx, [rax]."""
    return b"\x48\xb8" + struct.pack("<Q", address) + b"\x48\x8b\x18"


SPIN = b"\xeb\xfe"  # jmp .
HLT = b"\xf4"  # privileged: faults at CPL3
EXIT_7 = store_to(MMIO_BASE + Doorbell.EXIT, 7) + SPIN
UNKNOWN_DOORBELL = store_to(MMIO_BASE + 0x100, 1) + SPIN
MMIO_READ = load_from(MMIO_BASE + Doorbell.EXIT) + SPIN
PORT_OUT = b"\xb0\x41\xe6\x80" + SPIN  # mov al, 'A'; out 0x80, al -> #GP (IOPL 0)
UD2 = b"\x0f\x0b"  # invalid opcode
WILD_WRITE = store_to(0x1000_0000, 1) + SPIN  # beyond a 32 MiB guest's RAM: not mapped


def exit_with(code: int, delay_loops: int = 0) -> bytes:
    """Optionally `mov ecx, delay_loops; loop .` (a busy delay without exits), then write
    `code` (< 2**31) to the EXIT doorbell."""
    delay = b"\xb9" + struct.pack("<I", delay_loops) + b"\xe2\xfe" if delay_loops else b""
    return delay + store_to(MMIO_BASE + Doorbell.EXIT, code) + SPIN


_NOP = store_to(MMIO_BASE + Doorbell.NOP, 1)
NOP_LOOP = _NOP + b"\xeb" + bytes([256 - len(_NOP) - 2])  # exits for ever, prints nothing
