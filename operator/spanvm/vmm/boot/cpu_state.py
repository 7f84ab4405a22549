"""x86 register state at boot, as free functions over KVM's `kvm_sregs`/`kvm_regs`.

Segment descriptor fields per the Intel SDM vol. 3A §3.4.5; the states are those the boot
protocols require: Multiboot 0.6.96 §3.2 "Machine state" (32-bit protected mode, flat
segments, paging off) and Linux Documentation/arch/x86/boot.rst "64-bit Boot Protocol" (long
mode, identity-mapped paging, __BOOT_CS 0x10 / __BOOT_DS 0x18 flat, interrupts off).
"""

from spanvm.vmm import kvm_abi

CR0_PE, CR0_ET, CR0_NE, CR0_PG = 0x1, 0x10, 0x20, 0x8000_0000
CR4_PAE = 0x20
EFER_LME, EFER_LMA = 0x100, 0x400
RFLAGS_RESERVED = 0x2
TYPE_CODE_RX_ACCESSED, TYPE_DATA_RW_ACCESSED = 0xB, 0x3


def flat_segment(selector: int, code: bool, long_mode: bool = False) -> kvm_abi.KvmSegment:
    """A present, DPL-0, 4 GiB flat segment (64-bit code if `long_mode`)."""
    return kvm_abi.KvmSegment(
        base=0,
        limit=0xFFFF_FFFF,
        selector=selector,
        type=TYPE_CODE_RX_ACCESSED if code else TYPE_DATA_RW_ACCESSED,
        present=1,
        dpl=0,
        db=0 if (code and long_mode) else 1,
        s=1,
        l=1 if (code and long_mode) else 0,
        g=1,
        avl=0,
    )


def protected_mode_flat(sregs: kvm_abi.KvmSregs, code_selector: int, data_selector: int) -> None:
    """32-bit protected mode, paging off, flat CS and data segments (Multiboot §3.2)."""
    sregs.cs = flat_segment(code_selector, code=True)
    data = flat_segment(data_selector, code=False)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & ~CR0_PG
    sregs.cr4 = 0
    sregs.efer = 0


def long_mode_flat(
    sregs: kvm_abi.KvmSregs, code_selector: int, data_selector: int, pml4: int, gdt: tuple[int, int]
) -> None:
    """64-bit mode at CPL0 with paging rooted at `pml4` and the GDT at `gdt` = (base, limit)."""
    sregs.cs = flat_segment(code_selector, code=True, long_mode=True)
    data = flat_segment(data_selector, code=False)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt.base, sregs.gdt.limit = gdt
    sregs.cr3 = pml4
    sregs.cr4 |= CR4_PAE
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_NE | CR0_PG
    sregs.efer |= EFER_LME | EFER_LMA


def regs_at(rip: int, **values: int) -> kvm_abi.KvmRegs:
    """General registers: `rip`, the reserved RFLAGS bit, and any named register."""
    regs = kvm_abi.KvmRegs(rip=rip, rflags=RFLAGS_RESERVED)
    for name, value in values.items():
        setattr(regs, name, value)
    return regs
