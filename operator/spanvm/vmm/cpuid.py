"""The CPUID a vCPU presents: KVM_GET_SUPPORTED_CPUID with this vCPU's APIC id and a topology
that matches the VM (one thread per core, all cores in one package).

Leaves as in the Intel SDM vol. 2A, CPUID: leaf 1 EBX[31:24] initial APIC id and EBX[23:16]
logical processors per package, ECX[13] CMPXCHG16B, ECX[21] x2APIC, ECX[31] hypervisor
present; leaf 4 EAX[31:26] cores per package - 1; leaves 0xB/0x1F extended topology (EDX =
x2APIC id, level 0 SMT with 1 thread, level 1 core with `vcpu_count` processors).
"""

import ctypes
from dataclasses import dataclass

from spanvm.vmm import kvm_abi

CPUID_1_ECX_CX16 = 1 << 13
CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_HYPERVISOR = 1 << 31
LEVEL_SMT, LEVEL_CORE = 1, 2


@dataclass(frozen=True)
class CpuidOptions:
    """Features to hide from the guest; `cx16=False` hides CMPXCHG16B, which this machine's
    KVM cannot emulate at CPL0 (Linux's slab allocator uses it when advertised);
    `x2apic=False` hides x2APIC (leaf 1 ECX[21]): the guest drives its LAPICs in xAPIC mode."""

    cx16: bool = True
    x2apic: bool = True


def _shift_for(count: int) -> int:
    return max(count - 1, 0).bit_length()


def vcpu_cpuid(
    supported: kvm_abi.KvmCpuid2, vcpu_id: int, vcpu_count: int, options: CpuidOptions
) -> kvm_abi.KvmCpuid2:
    """A copy of `supported` fitted to vCPU `vcpu_id` of a `vcpu_count`-vCPU VM."""
    cpuid = kvm_abi.KvmCpuid2()
    ctypes.memmove(ctypes.addressof(cpuid), ctypes.addressof(supported), ctypes.sizeof(cpuid))
    for i in range(cpuid.nent):
        entry = cpuid.entries[i]
        if entry.function == 1:
            entry.ebx = (entry.ebx & 0x0000FFFF) | (vcpu_id << 24) | (min(vcpu_count, 255) << 16)
            entry.ecx |= CPUID_1_ECX_HYPERVISOR
            if not options.cx16:
                entry.ecx &= ~CPUID_1_ECX_CX16
            if not options.x2apic:
                entry.ecx &= ~CPUID_1_ECX_X2APIC
            entry.edx |= 1 << 28  # HTT: leaf 1 EBX[23:16] is valid
        elif entry.function == 4:
            entry.eax = (entry.eax & 0x03FF_FFFF) | ((min(vcpu_count, 64) - 1) << 26)
        elif entry.function in (0xB, 0x1F):
            entry.edx = vcpu_id
            if entry.index == 0:  # SMT level: one thread per core
                entry.eax, entry.ebx, entry.ecx = 0, 1, (LEVEL_SMT << 8)
            elif entry.index == 1:  # core level: every vCPU of the VM
                entry.eax, entry.ebx = _shift_for(vcpu_count), vcpu_count
                entry.ecx = (LEVEL_CORE << 8) | 1
            else:
                entry.eax = entry.ebx = 0
                entry.ecx = entry.index
    return cpuid
