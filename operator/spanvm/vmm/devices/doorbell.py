"""The spanvm doorbell: an MMIO page (no memory slot, so every store exits) through which ring-3
payloads print, exit, park and report exceptions. Registers: `layout.Doorbell`, mirrored by
payloads/src/spanvm.h."""

import struct
import time
from typing import Protocol

from spanvm.vmm import layout
from spanvm.vmm.bus import VcpuStopError
from spanvm.vmm.devices import DeviceHost
from spanvm.vmm.layout import Doorbell as Reg
from spanvm.vmm.vcpu import Vcpu

MAX_MARKS = 4096


class DoorbellHost(DeviceHost, Protocol):
    """What the doorbell needs beyond any device: guest exit/park and symbols."""

    marks: list[tuple[int, int, float]]

    def park(self, vcpu: Vcpu) -> None: ...

    def symbolize(self, address: int) -> str: ...


class Doorbell:
    """Stores to the doorbell registers act at once; loads are a guest error."""

    def __init__(self, host: DoorbellHost) -> None:
        self.host = host

    def read(self, vcpu: Vcpu, offset: int, size: int) -> int:
        self.host.fail(
            self.host.describe(
                vcpu,
                f"read from unmapped guest-physical address {layout.MMIO_BASE + offset:#x}"
                f" ({size} bytes)",
            )
        )
        raise VcpuStopError

    def write(self, vcpu: Vcpu, offset: int, size: int, value: int) -> None:
        host = self.host
        if offset == Reg.WRITE:
            length, address = value >> 48, value & ((1 << 48) - 1)
            try:
                host.console.write(host.guest_memory.read(address, length))
            except ValueError:
                host.fail(
                    host.describe(
                        vcpu,
                        f"console write of {length} bytes at {address:#x} is outside guest RAM",
                    )
                )
                raise VcpuStopError from None
        elif offset == Reg.PUTC:
            host.console.write(bytes([value & 0xFF]))
        elif offset == Reg.FAULT:
            host.fail(f"vCPU {vcpu.id}: {self._describe_exception(vcpu, value)}")
            raise VcpuStopError
        elif offset == Reg.NOP:
            if len(host.marks) < MAX_MARKS:
                host.marks.append((vcpu.id, value, time.monotonic()))
        elif offset == Reg.EXIT:
            host.guest_exit(vcpu, value & 0xFFFFFFFF)
            raise VcpuStopError
        elif offset == Reg.PARK:
            host.park(vcpu)
            raise VcpuStopError
        else:
            host.fail(host.describe(vcpu, f"write to unknown doorbell register {offset:#x}"))
            raise VcpuStopError

    def _describe_exception(self, vcpu: Vcpu, frame_address: int) -> str:
        """The guest's exception, from the frame its ring-0 stub reported: vector, error code,
        where it happened (symbolised), and CR2 for a page fault."""
        try:
            frame = struct.unpack("<7Q", self.host.guest_memory.read(frame_address, 56))
        except ValueError:
            return f"guest exception with an unreadable frame at {frame_address:#x}"
        vector, error, rip, _cs, rflags, rsp, _ss = frame
        name = layout.EXCEPTIONS.get(vector, f"vector {vector}")
        where = self.host.symbolize(rip)
        text = f"guest exception {name} (error code {error:#x}) at rip={rip:#x}"
        text += f" ({where})" if where else ""
        text += f" rsp={rsp:#x} rflags={rflags:#x}"
        if vector == 14:
            access = "write" if error & 2 else "read"
            not_present = ", not present" if not error & 1 else ""
            text += f" cr2={vcpu.sregs().cr2:#x} ({access}{not_present})"
        return text
