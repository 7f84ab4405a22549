"""One KVM vCPU: its fd, its shared `struct kvm_run` page, registers, CPUID, MSRs, LAPIC and
MP state (Documentation/virt/kvm/api.rst), and the kick that makes KVM_RUN return.

The run loop lives in `machine.py`; what a vCPU looks like at reset is set by boot sources
(`boot/`) through the setters here.
"""

import ctypes
import os
import threading

from spanvm.vmm import kvm_abi

# Local APIC register offsets and LVT delivery modes (Intel SDM vol. 3A §11.5.1, Figure 11-8).
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


class Vcpu:
    """One vCPU of a `Vm`: created with KVM_CREATE_VCPU `vcpu_id` (which is its APIC id)."""

    def __init__(self, vm_fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.id = vcpu_id
        self.fd = kvm_abi.ioctl(
            vm_fd, kvm_abi.KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU {vcpu_id}"
        )
        self.mmap_size = mmap_size
        try:
            self.run_address = kvm_abi.mmap_fd(self.fd, mmap_size)
        except OSError:
            os.close(self.fd)
            raise
        self.run = kvm_abi.KvmRunHeader.from_address(self.run_address)
        self.exits = 0
        self.parked = False
        self.thread: threading.Thread | None = None
        # Kicks are sent only while the thread is in its loop: a signal to a thread that has
        # exited may reach another thread that reuses its pthread_t, after the handler is gone.
        self.kick_lock = threading.RLock()  # a signal handler on this thread may kick too
        self.looping = False
        self.closed = False  # set under kick_lock before kvm_run is unmapped: kicks skip it

    def exit_union(self, kind: type[ctypes.Structure]) -> ctypes.Structure:
        return kind.from_address(self.run_address + kvm_abi.KVM_EXIT_UNION_OFFSET)

    def regs(self) -> kvm_abi.KvmRegs:
        regs = kvm_abi.KvmRegs()
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: kvm_abi.KvmRegs) -> None:
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def sregs(self) -> kvm_abi.KvmSregs:
        sregs = kvm_abi.KvmSregs()
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: kvm_abi.KvmSregs) -> None:
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def set_cpuid(self, cpuid: kvm_abi.KvmCpuid2) -> None:
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def set_fpu(self, fcw: int = 0x37F, mxcsr: int = 0x1F80) -> None:
        """The x87/SSE control words at their reset values (SDM vol. 1 §8.1.5, §10.2.3)."""
        fpu = kvm_abi.KvmFpu(fcw=fcw, mxcsr=mxcsr)
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def set_virtual_wire(self) -> None:
        """LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as a PC BIOS leaves the local
        APIC (MP spec 1.4 §3.6.2.2 "virtual wire mode"): Linux expects it at boot."""
        state = kvm_abi.KvmLapicState()
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_GET_LAPIC, state, "KVM_GET_LAPIC")
        for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
            value = int.from_bytes(bytes(state.regs[offset : offset + 4]), "little")
            value = (value & ~0x700) | (mode << 8)
            state.regs[offset : offset + 4] = list(value.to_bytes(4, "little"))
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_SET_LAPIC, state, "KVM_SET_LAPIC")

    def _tsc_attr(self, value: ctypes.c_uint64) -> kvm_abi.KvmDeviceAttr:
        return kvm_abi.KvmDeviceAttr(
            group=kvm_abi.KVM_VCPU_TSC_CTRL,
            attr=kvm_abi.KVM_VCPU_TSC_OFFSET,
            addr=ctypes.addressof(value),
        )

    def set_tsc_offset(self, offset: int) -> None:
        """KVM_VCPU_TSC_OFFSET (api.rst, "vCPU TSC offset"): the guest's TSC reads the host's
        TSC plus `offset` (two's complement, 64 bits). Every fragment sets the same offset,
        so a TSC read on one vCPU never exceeds a later read on a vCPU of another fragment
        on the same host. (This machine's PVM KVM passes the host TSC through whatever is
        set: the attribute reads back 0.)"""
        value = ctypes.c_uint64(offset & (1 << 64) - 1)
        attr = self._tsc_attr(value)
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_SET_DEVICE_ATTR, attr, "KVM_SET_DEVICE_ATTR TSC offset")

    def set_msr(self, index: int, data: int) -> bool:
        """KVM_SET_MSRS of one MSR (host-initiated: MSR filters do not apply); False if KVM
        refused the value (for a guest WRMSR: #GP)."""
        msrs = kvm_abi.KvmMsrs1(nmsrs=1, entry=kvm_abi.KvmMsrEntry(index=index, data=data))
        return kvm_abi.ioctl(self.fd, kvm_abi.KVM_SET_MSRS, msrs, f"KVM_SET_MSRS {index:#x}") == 1

    def set_mp_state(self, state: int) -> None:
        mp = kvm_abi.KvmMpState(state)
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_SET_MP_STATE, mp, "KVM_SET_MP_STATE")

    def translate(self, linear: int) -> int | None:
        """The guest-physical address of a linear address under the vCPU's current paging
        (KVM_TRANSLATE), or None if it is not mapped."""
        tr = kvm_abi.KvmTranslation(linear_address=linear)
        try:
            kvm_abi.ioctl(self.fd, kvm_abi.KVM_TRANSLATE, tr, "KVM_TRANSLATE")
        except OSError:
            return None
        return int(tr.physical_address) if tr.valid else None

    def close(self) -> None:
        """Unmap kvm_run and close the fd (idempotent). Under kick_lock: a kick from another
        thread (a fabric reader failing the VM during shutdown) never writes to kvm_run after
        it is unmapped."""
        with self.kick_lock:
            if self.closed:
                return
            self.closed = True
            kvm_abi.munmap(self.run_address, self.mmap_size)
            os.close(self.fd)
