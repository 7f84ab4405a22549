"""isa-debug-exit: a 4-byte write port (0xf4 by convention, as QEMU's `-device isa-debug-exit`)
whose value is the guest's exit code; kvm-unit-tests ends every test with `outl(code, 0xf4)`.

QEMU exits with `(code << 1) | 1`; spanvm reports `code` itself as the VM's exit code (through
the VM's exit path, so a fragment forwards it to fragment 0 like a payload's EXIT doorbell).
"""

from spanvm.vmm.bus import VcpuStopError
from spanvm.vmm.devices import DeviceHost
from spanvm.vmm.vcpu import Vcpu

PORT = 0xF4
SIZE = 4


class DebugExit:
    """Stops the VM with the written value as its exit code."""

    def __init__(self, host: DeviceHost) -> None:
        self.host = host

    def read(self, vcpu: Vcpu, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, vcpu: Vcpu, offset: int, size: int, value: int) -> None:
        self.host.guest_exit(vcpu, value)
        raise VcpuStopError
