"""The guest-physical layout every fragment builds, and the CPL3 long-mode state.

```
0x0000_0000  unmapped (null page)
0x0000_1000  GDT               supervisor
0x0000_2000  TSS per vCPU       supervisor
0x0000_6000  IDT, ring-0 stubs supervisor (exceptions are reported through the doorbell)
0x0001_0000  page tables       supervisor (PML4, PDPT, PT of the first 2 MiB, PDs)
0x0008_0000  boot-info pages   user read-only, one per vCPU
0x0010_0000  ring-0 stacks     supervisor, 4 KiB per vCPU (exceptions only)
0x0020_0000  payload image     user (code, data, bss)
  ...        vCPU stacks       user, STACK_SIZE each
  ...        heap              user, the rest of RAM (ranges listed in the boot info)
0xD000_0000  MMIO doorbell     user; no memory slot, so every store exits to the monitor
0x1_0000_0000  RAM above 3 GiB, if any
```
The payload runs at CPL3 (DPL-3 selectors, U/S page-table entries): this KVM emulates CPL0
about 10,000x slower than it runs CPL3. Every fragment builds the same bytes, so the
read-only system area never needs the memory fabric.
"""

import ctypes
import struct
from dataclasses import dataclass

from spanvm.vmm import kvm_abi
from spanvm.vmm.memmap import (
    DOORBELL_BASE,
    DOORBELL_SIZE,
    LARGE_PAGE,
    MAX_MEMORY,
    PAGE,
    RamRange,
    align_up,
)
from spanvm.vmm.memory import GuestMemory

GDT_BASE = 0x1000
TSS_BASE = 0x2000  # one 128-byte TSS per vCPU, up to 0x6000
TSS_STRIDE = 0x80
IDT_BASE = 0x6000
STUBS_BASE = 0x7000  # ring-0 exception stubs: report through the doorbell, then stop
KSTACK_BASE = 0x10_0000  # one 4 KiB ring-0 stack per vCPU (exceptions only), up to 0x18_0000
PT_BASE = 0x1_0000
PT_LIMIT = 0x8_0000
BOOTINFO_BASE = 0x8_0000
MAX_VCPUS = (0x10_0000 - BOOTINFO_BASE) // PAGE
SYSTEM_AREA_END = 0x20_0000
IMAGE_BASE = 0x20_0000
STACK_SIZE = 0x1_0000
MMIO_BASE = DOORBELL_BASE
MMIO_SIZE = DOORBELL_SIZE
BOOTINFO_MAGIC = 0x49424D564E415053  # "SPANVMBI"
MAX_HEAP_RANGES = 4

SEL_USER_DATA = 0x18 | 3
SEL_USER_CODE = 0x20 | 3
SEL_KERNEL_CODE = 0x08
SEL_TSS = 0x28  # vCPU i's TSS descriptor is at SEL_TSS + 16 * i
GDT_ENTRIES = (
    0,
    0x00AF9B000000FFFF,  # 0x08 kernel code, 64-bit
    0x00CF93000000FFFF,  # 0x10 kernel data
    0x00CFF3000000FFFF,  # 0x18 user data, DPL 3
    0x00AFFB000000FFFF,  # 0x20 user code, 64-bit, DPL 3
)
TSS_SIZE = 0x68

PTE_P, PTE_RW, PTE_US, PTE_PWT, PTE_PCD, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 0x1_0000, 0x8000_0000
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA = 0x100, 0x400
RFLAGS_RESERVED = 0x2


class Doorbell:
    """Registers of the MMIO doorbell (offsets from MMIO_BASE); mirrors payloads/src/spanvm.h."""

    PUTC = 0x00
    WRITE = 0x08  # (len << 48) | guest address of the bytes
    EXIT = 0x10
    PARK = 0x18
    NOP = 0x20
    FAULT = 0x28  # ring-0 stub: address of the exception frame (vector, error, rip, cs, ...)


class HeapRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64)]


class BootInfo(ctypes.Structure):
    """The boot-info page of one vCPU; mirrors `struct spanvm_bootinfo` in spanvm.h."""

    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("vcpu_id", ctypes.c_uint32),
        ("vcpu_count", ctypes.c_uint32),
        ("ram_size", ctypes.c_uint64),
        ("mmio_base", ctypes.c_uint64),
        ("arg", ctypes.c_uint64),
        ("stack_top", ctypes.c_uint64),
        ("nr_ranges", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("heap", HeapRange * MAX_HEAP_RANGES),
        ("self", ctypes.c_uint64),
    ]


class LayoutError(ValueError):
    """The requested guest does not fit the layout (too much memory, image too large, ...)."""


@dataclass(frozen=True)
class GuestLayout:
    """Where a guest of a given size, vCPU count and image size keeps its pieces."""

    memory_size: int
    vcpu_count: int
    ranges: tuple[RamRange, ...]
    image_end: int
    stacks_base: int
    heap: tuple[tuple[int, int], ...]

    @classmethod
    def plan(
        cls,
        memory_size: int,
        vcpu_count: int,
        image_end: int,
        ranges: tuple[RamRange, ...],
        image_name: str = "payload image",
    ) -> "GuestLayout":
        """Check the sizes fit and place stacks and heap after the image (LayoutError saying
        which does not fit, naming the image as `image_name`)."""
        if memory_size % LARGE_PAGE:
            raise LayoutError(f"memory must be a multiple of 2Mi, got {memory_size} bytes")
        if memory_size > MAX_MEMORY:
            raise LayoutError(f"memory above {MAX_MEMORY >> 30}Gi is not supported by this VMM")
        if not 1 <= vcpu_count <= MAX_VCPUS:
            raise LayoutError(f"vcpus must be between 1 and {MAX_VCPUS}, got {vcpu_count}")
        stacks_base = align_up(image_end, PAGE)
        heap_start = align_up(stacks_base + vcpu_count * STACK_SIZE, LARGE_PAGE)
        low_end = ranges[0].end
        if heap_start >= low_end:
            raise LayoutError(
                f"{image_name} ({image_end - IMAGE_BASE} bytes) and {vcpu_count} vCPU stacks"
                f" do not fit in {memory_size >> 20} MiB of guest memory"
            )
        heap = [(heap_start, low_end)] + [(r.gpa, r.end) for r in ranges[1:]]
        return cls(memory_size, vcpu_count, ranges, image_end, stacks_base, tuple(heap))

    def stack_top(self, vcpu_id: int) -> int:
        return self.stacks_base + (vcpu_id + 1) * STACK_SIZE

    def bootinfo_address(self, vcpu_id: int) -> int:
        return BOOTINFO_BASE + vcpu_id * PAGE


def _page_tables(layout: GuestLayout) -> dict[int, bytes]:
    """The identity-mapping page tables, as {guest-physical address: page bytes}."""
    user_2m = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_PS
    table = PTE_P | PTE_RW | PTE_US | PTE_A
    pml4, pdpt, pt0 = PT_BASE, PT_BASE + PAGE, PT_BASE + 2 * PAGE
    next_pd = PT_BASE + 3 * PAGE
    pds: dict[int, list[int]] = {}

    def pd_for(gpa: int) -> list[int]:
        return pds.setdefault(gpa >> 30, [0] * 512)

    for r in layout.ranges:
        for gpa in range(r.gpa, r.end, LARGE_PAGE):
            pd_for(gpa)[(gpa >> 21) & 511] = gpa | user_2m
    for gpa in range(MMIO_BASE, MMIO_BASE + MMIO_SIZE, LARGE_PAGE):
        pd_for(gpa)[(gpa >> 21) & 511] = gpa | user_2m | PTE_PCD | PTE_PWT
    pd_for(0)[0] = pt0 | table

    pdpt_entries = [0] * 512
    pages: dict[int, bytes] = {}
    for gib in sorted(pds):
        if next_pd >= PT_LIMIT:
            raise LayoutError("guest memory needs more page tables than the layout holds")
        pdpt_entries[gib] = next_pd | table
        pages[next_pd] = struct.pack("<512Q", *pds[gib])
        next_pd += PAGE

    supervisor = PTE_P | PTE_RW | PTE_A | PTE_D
    pt_entries = [0] * 512
    kstacks = range(KSTACK_BASE, KSTACK_BASE + layout.vcpu_count * PAGE, PAGE)
    tss_pages = range(TSS_BASE, IDT_BASE, PAGE)
    for gpa in (
        GDT_BASE,
        *tss_pages,
        IDT_BASE,
        STUBS_BASE,
        *range(PT_BASE, next_pd, PAGE),
        *kstacks,
    ):
        pt_entries[gpa >> 12] = gpa | supervisor
    for vcpu in range(layout.vcpu_count):
        gpa = layout.bootinfo_address(vcpu)
        pt_entries[gpa >> 12] = gpa | PTE_P | PTE_US | PTE_A
    pages[pml4] = struct.pack("<512Q", pdpt | table, *([0] * 511))
    pages[pdpt] = struct.pack("<512Q", *pdpt_entries)
    pages[pt0] = struct.pack("<512Q", *pt_entries)
    return pages


def _gdt(vcpu_count: int) -> bytes:
    """The fixed descriptors, then one 64-bit TSS descriptor per vCPU."""
    entries = list(GDT_ENTRIES)
    for vcpu in range(vcpu_count):
        base = TSS_BASE + vcpu * TSS_STRIDE
        entries.append(
            (TSS_SIZE - 1)
            | ((base & 0xFFFFFF) << 16)
            | (0x8B << 40)
            | (((base >> 24) & 0xFF) << 56)
        )
        entries.append(base >> 32)
    return struct.pack(f"<{len(entries)}Q", *entries)


def _tss(rsp0: int) -> bytes:
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, rsp0)  # the ring-0 stack an exception switches to
    struct.pack_into("<H", tss, 0x66, TSS_SIZE)  # I/O map base beyond the limit: no port access
    return bytes(tss)


EXCEPTIONS = {
    0: "#DE divide error",
    1: "#DB debug",
    2: "NMI",
    3: "#BP breakpoint",
    4: "#OF overflow",
    5: "#BR bound range",
    6: "#UD invalid opcode",
    7: "#NM device not available",
    8: "#DF double fault",
    10: "#TS invalid TSS",
    11: "#NP segment not present",
    12: "#SS stack fault",
    13: "#GP general protection",
    14: "#PF page fault",
    16: "#MF x87 error",
    17: "#AC alignment check",
    18: "#MC machine check",
    19: "#XM SIMD error",
    20: "#VE virtualization",
    21: "#CP control protection",
}
WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
VECTORS = 32
STUB_SIZE = 16


def _stubs() -> bytes:
    """Ring-0 code: per vector `push 0 (if no error code); push vector; jmp common`; common
    stores the frame's address to the FAULT doorbell (the monitor reads the frame) and spins."""
    common = VECTORS * STUB_SIZE
    code = bytearray()
    for vector in range(VECTORS):
        stub = b"" if vector in WITH_ERROR_CODE else b"\x6a\x00"
        stub += b"\x6a" + bytes([vector])
        rel = common - (len(code) + len(stub) + 5)
        stub += b"\xe9" + struct.pack("<i", rel)
        code += stub.ljust(STUB_SIZE, b"\xcc")
    code += b"\x48\x89\xe0"  # mov rax, rsp
    code += b"\x48\xbb" + struct.pack("<Q", MMIO_BASE + Doorbell.FAULT)  # movabs rbx, FAULT
    code += b"\x48\x89\x03"  # mov [rbx], rax
    code += b"\xeb\xfe"  # jmp .
    return bytes(code)


def _idt() -> bytes:
    """64-bit interrupt gates (DPL 0, kernel code) pointing at the stubs."""
    gates = []
    for vector in range(VECTORS):
        offset = STUBS_BASE + vector * STUB_SIZE
        low = (
            (offset & 0xFFFF)
            | (SEL_KERNEL_CODE << 16)
            | (0x8E << 40)
            | (((offset >> 16) & 0xFFFF) << 48)
        )
        gates += [low, offset >> 32]
    return struct.pack(f"<{len(gates)}Q", *gates)


def write_system_area(memory: GuestMemory, layout: GuestLayout, arg: int) -> None:
    """Write GDT, TSS, page tables and every vCPU's boot-info page into guest RAM."""
    memory.write(GDT_BASE, _gdt(layout.vcpu_count))
    for vcpu in range(layout.vcpu_count):
        memory.write(TSS_BASE + vcpu * TSS_STRIDE, _tss(KSTACK_BASE + (vcpu + 1) * PAGE))
    memory.write(IDT_BASE, _idt())
    memory.write(STUBS_BASE, _stubs())
    for gpa, page in _page_tables(layout).items():
        memory.write(gpa, page)
    for vcpu in range(layout.vcpu_count):
        info = BootInfo(
            magic=BOOTINFO_MAGIC,
            vcpu_id=vcpu,
            vcpu_count=layout.vcpu_count,
            ram_size=layout.memory_size,
            mmio_base=MMIO_BASE,
            arg=arg,
            stack_top=layout.stack_top(vcpu),
            nr_ranges=len(layout.heap),
            self=layout.bootinfo_address(vcpu),
        )
        for i, (start, end) in enumerate(layout.heap):
            info.heap[i] = HeapRange(start, end)
        memory.write_struct(layout.bootinfo_address(vcpu), info)


def _segment(selector: int, code: bool) -> kvm_abi.KvmSegment:
    return kvm_abi.KvmSegment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=0xB if code else 0x3,
        present=1,
        dpl=3,
        db=0 if code else 1,
        s=1,
        l=1 if code else 0,
        g=1,
    )


def user_mode_sregs(
    sregs: kvm_abi.KvmSregs, bootinfo_address: int, vcpu_id: int, vcpu_count: int
) -> None:
    """Fill special registers for 64-bit long mode, paging on, the vCPU at CPL3; FS points at
    the vCPU's boot-info page so the guest runtime finds it without shared state."""
    sregs.cs = _segment(SEL_USER_CODE, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(SEL_USER_DATA, code=False))
    sregs.fs.base = bootinfo_address
    sregs.tr = kvm_abi.KvmSegment(
        base=TSS_BASE + vcpu_id * TSS_STRIDE,
        limit=TSS_SIZE - 1,
        selector=SEL_TSS + 16 * vcpu_id,
        type=0xB,
        present=1,
    )
    sregs.ldt = kvm_abi.KvmSegment(type=2, present=1, unusable=1)
    sregs.gdt.base, sregs.gdt.limit = GDT_BASE, (len(GDT_ENTRIES) + 2 * vcpu_count) * 8 - 1
    sregs.idt.base, sregs.idt.limit = IDT_BASE, VECTORS * 16 - 1
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = PT_BASE
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA


def user_mode_regs(layout: GuestLayout, vcpu_id: int, entry: int) -> kvm_abi.KvmRegs:
    """General registers at the payload's entry: rip, its stack, rdi = its boot-info page."""
    return kvm_abi.KvmRegs(
        rip=entry,
        rsp=layout.stack_top(vcpu_id),
        rflags=RFLAGS_RESERVED,
        rdi=layout.bootinfo_address(vcpu_id),
    )
