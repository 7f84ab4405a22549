"""The KVM virtual machine: the /dev/kvm and VM fds, memory slots, the in-kernel irqchip and
PIT, interrupt lines, and what KVM supports (CPUID, vCPU limit).

Source: the kernel's Documentation/virt/kvm/api.rst (KVM_CREATE_VM, KVM_SET_TSS_ADDR,
KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2, KVM_IRQ_LINE, KVM_SET_USER_MEMORY_REGION,
KVM_GET_SUPPORTED_CPUID, KVM_CAP_MAX_VCPUS, KVM_SIGNAL_MSI).
"""

import ctypes
import os

from spanvm.vmm import kvm_abi
from spanvm.vmm.errors import VmError
from spanvm.vmm.memmap import KVM_TSS_ADDR
from spanvm.vmm.memory import GuestMemory


class Vm:
    """One KVM VM with the in-kernel irqchip (PIC, IOAPIC, a LAPIC per vCPU) and PIT.

    Raises VmError naming the device when /dev/kvm cannot be opened or speaks another API.
    Call `close()` (idempotent) to release the fds."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.kvm_fd = self.fd = -1
        try:
            self.kvm_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise VmError(f"cannot open {device}: {err.strerror}") from None
        try:
            version = kvm_abi.ioctl(
                self.kvm_fd, kvm_abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION"
            )
            if version != kvm_abi.KVM_API_VERSION:
                raise VmError(
                    f"{device} speaks KVM API {version}, expected {kvm_abi.KVM_API_VERSION}"
                )
            self.fd = kvm_abi.ioctl(self.kvm_fd, kvm_abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
            kvm_abi.ioctl(self.fd, kvm_abi.KVM_SET_TSS_ADDR, KVM_TSS_ADDR, "KVM_SET_TSS_ADDR")
            kvm_abi.ioctl(self.fd, kvm_abi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
            pit = kvm_abi.KvmPitConfig(flags=kvm_abi.KVM_PIT_SPEAKER_DUMMY)
            kvm_abi.ioctl(self.fd, kvm_abi.KVM_CREATE_PIT2, pit, "KVM_CREATE_PIT2")
            self.vcpu_mmap_size = kvm_abi.ioctl(
                self.kvm_fd, kvm_abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"
            )
        except BaseException:
            self.close()
            raise

    def route_gsis(self, isa_pins: dict[int, int], pins: int) -> None:
        """KVM_SET_GSI_ROUTING as the firmware tables describe the wiring: GSI i < 16 (ISA IRQ
        i) reaches PIC pin i and, if it is in `isa_pins` (PlatformShape.isa_ioapic_pins), that
        IOAPIC pin (the PIT's IRQ 0 on pin 2; IRQ 2, the cascade, on none); GSIs 16 and up
        reach their own pin. Replaces KVM's identity routing, as QEMU's
        kvm_pc_setup_irq_routing does for the same tables."""
        routes = []
        for gsi in range(16):
            chip = kvm_abi.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else kvm_abi.KVM_IRQCHIP_PIC_SLAVE
            routes.append((gsi, chip, gsi % 8))
        routes += [(gsi, kvm_abi.KVM_IRQCHIP_IOAPIC, pin) for gsi, pin in isa_pins.items()]
        routes += [(gsi, kvm_abi.KVM_IRQCHIP_IOAPIC, gsi) for gsi in range(16, pins)]
        table = kvm_abi.KvmIrqRouting(nr=len(routes))
        for entry, (gsi, chip, pin) in zip(table.entries, routes, strict=False):
            entry.gsi, entry.type = gsi, kvm_abi.KVM_IRQ_ROUTING_IRQCHIP
            entry.u.irqchip, entry.u.pin = chip, pin
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    def max_vcpus(self) -> int:
        """KVM_CAP_MAX_VCPUS (falling back to KVM_CAP_NR_VCPUS, then 4, as api.rst says)."""
        for cap in ("MAX_VCPUS", "NR_VCPUS"):
            n = kvm_abi.ioctl(self.kvm_fd, kvm_abi.KVM_CHECK_EXTENSION, kvm_abi.CAPABILITIES[cap])
            if n > 0:
                return n
        return 4

    def supported_cpuid(self) -> kvm_abi.KvmCpuid2:
        """KVM_GET_SUPPORTED_CPUID: every leaf this KVM can present to a guest."""
        cpuid = kvm_abi.KvmCpuid2(nent=kvm_abi.MAX_CPUID_ENTRIES)
        kvm_abi.ioctl(
            self.kvm_fd, kvm_abi.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID"
        )
        return cpuid

    def map_memory(self, memory: GuestMemory) -> None:
        """One memory slot per RAM range of `memory`."""
        for slot, ram in enumerate(memory.ranges):
            self.map_region(slot, ram.gpa, ram.size, memory.host_address + ram.host_offset)

    def map_region(self, slot: int, gpa: int, size: int, host_address: int) -> None:
        """Memory slot `slot`: `size` bytes at guest-physical `gpa`, backed at `host_address`
        (memory outside guest RAM, such as the proxy vCPUs' area)."""
        region = kvm_abi.KvmUserspaceMemoryRegion(
            slot=slot,
            flags=0,
            guest_phys_addr=gpa,
            memory_size=size,
            userspace_addr=host_address,
        )
        kvm_abi.ioctl(
            self.fd, kvm_abi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION"
        )

    def trap_msr_writes(self, indexes: list[int]) -> None:
        """Send the guest's WRMSR of each MSR in `indexes` to userspace (KVM_EXIT_X86_WRMSR):
        KVM_CAP_X86_USER_SPACE_MSR with KVM_MSR_EXIT_REASON_FILTER and an MSR filter that
        denies those writes (every other access stays in KVM). api.rst, "KVM_X86_SET_MSR_FILTER";
        the x2APIC MSRs (0x800-0x8FF) cannot be filtered."""
        cap = kvm_abi.KvmEnableCap(cap=kvm_abi.KVM_CAP_X86_USER_SPACE_MSR)
        cap.args[0] = kvm_abi.KVM_MSR_EXIT_REASON_FILTER
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_ENABLE_CAP, cap, "KVM_ENABLE_CAP X86_USER_SPACE_MSR")
        bitmap = (ctypes.c_uint8 * 1)(0)  # one MSR per range, its bit 0: denied (KVM copies it)
        flt = kvm_abi.KvmMsrFilter()
        for i, index in enumerate(indexes):
            flt.ranges[i].flags = kvm_abi.KVM_MSR_FILTER_WRITE
            flt.ranges[i].nmsrs, flt.ranges[i].base = 1, index
            flt.ranges[i].bitmap = ctypes.addressof(bitmap)
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_X86_SET_MSR_FILTER, flt, "KVM_X86_SET_MSR_FILTER")

    def signal_msi(self, address: int, data: int) -> None:
        """KVM_SIGNAL_MSI: deliver the MSI (`address`, `data`) to the in-kernel LAPICs.
        KvmError if KVM refuses it; an MSI no LAPIC accepts is not an error."""
        message = kvm_abi.KvmMsi(
            address_lo=address & 0xFFFF_FFFF, address_hi=address >> 32, data=data
        )
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_SIGNAL_MSI, message, "KVM_SIGNAL_MSI")

    def set_irq_line(self, irq: int, level: bool) -> None:
        """Drive GSI `irq` (ISA IRQs 0-15 reach both the PIC and the IOAPIC) high or low."""
        line = kvm_abi.KvmIrqLevel(irq=irq, level=int(level))
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_IRQ_LINE, line, f"KVM_IRQ_LINE {irq}")

    def close(self) -> None:
        for attr in ("fd", "kvm_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
