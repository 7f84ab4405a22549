"""Linux kernels through the 64-bit boot protocol: an ELF `vmlinux`, or a bzImage whose
compressed payload is unpacked here (or, with `unpack=False`, left to the kernel's own
decompressor).

Source: Linux Documentation/arch/x86/boot.rst, "64-bit Boot Protocol": the loader fills a
`struct boot_params` (the "zero page", layout in Documentation/arch/x86/zero-page.rst) whose
setup header comes from the kernel image, then enters the kernel's 64-bit entry (a bzImage's
protected-mode kernel +0x200; a vmlinux's ELF entry) in long mode at CPL0 with paging on and
an identity map covering the kernel, the zero page and the command line, a GDT holding
__BOOT_CS (0x10) and __BOOT_DS (0x18) flat descriptors, interrupts off and %rsi = the zero
page. "Loading The Rest of The Kernel" and "Details of Header Fields" give type_of_loader
0xff (undefined loader), cmd_line_ptr/cmdline_size, ramdisk_image/ramdisk_size and
initrd_addr_max (the initrd goes as high as possible below it). Firecracker's
`arch/x86_64` and kvmtool's `x86/kvm.c` load kernels the same way.

Guest-physical memory this boot source writes, all clear of memmap's reserved BIOS area
(EBDA_START and up: ACPI tables at ACPI_BASE, the MP table at MPTABLE_BASE):
```
0x0500          GDT (null, null, __BOOT_CS 0x10, __BOOT_DS 0x18)
0x1000-0x7000   boot stack (rsp = 0x7000)
0x7000          zero page (struct boot_params, 4 KiB)
0x9000          PML4; 0xA000 PDPT; 0xB000-0xEFFF four page directories of 2 MiB pages:
                the first 4 GiB identity-mapped
0x2_0000        command line (NUL-terminated)
kernel          at its ELF p_paddr (vmlinux) or pref_address (bzImage), at or above 1 MiB
initrd          page-aligned at the top of low RAM, below initrd_addr_max
```
Application processors are left waiting for INIT/SIPI, as the kernel's SMP bring-up expects.
"""

import struct
from pathlib import Path

from spanvm.vmm import kvm_abi
from spanvm.vmm.boot import BootError, GuestShape, read_file
from spanvm.vmm.boot import bzimage as bz
from spanvm.vmm.boot.cpu_state import long_mode_flat, regs_at
from spanvm.vmm.boot.elf import ElfImage, Segment, read_elf
from spanvm.vmm.memmap import (
    ACPI_BASE,
    HIGH_MEMORY_START,
    LARGE_PAGE,
    PAGE,
    E820Entry,
    align_up,
    e820_map,
    ram_ranges,
)
from spanvm.vmm.memory import GuestMemory
from spanvm.vmm.vcpu import Vcpu

GDT_BASE = 0x500
BOOT_STACK_TOP = 0x7000
ZERO_PAGE = 0x7000
PML4, PDPT, PD = 0x9000, 0xA000, 0xB000
IDENTITY_MAPPED = 4 << 30
COMMAND_LINE = 0x2_0000
BOOT_CS, BOOT_DS = 0x10, 0x18
# GDT entries (Intel SDM vol. 3A §3.4.5): 64-bit code (L, P, DPL0, type 0xB) and flat data
# (G, D/B, P, DPL0, type 3), matching cpu_state.flat_segment's descriptor caches.
GDT = struct.pack("<4Q", 0, 0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF)
PTE_PRESENT, PTE_WRITE, PTE_LARGE = 0x1, 0x2, 0x80
ENTRY_64_OFFSET = 0x200  # boot.rst "64-bit Boot Protocol": the 64-bit entry of a bzImage

# Synthesised setup header for a vmlinux, which has none (boot.rst field defaults).
VMLINUX_VERSION = 0x020F  # 2.15, the protocol the fields below follow
COMMAND_LINE_SIZE = 2048  # Linux's x86 COMMAND_LINE_SIZE, terminating NUL included
DEFAULT_INITRD_ADDR_MAX = 0x7FFF_FFFF
LOADED_HIGH = 0x1
TYPE_OF_LOADER_UNDEFINED = 0xFF
BOOT_FLAG = 0xAA55
HEADER_END = 0x270  # the 2.15 setup header spans 0x1F1 up to here

# struct boot_params fields outside the setup header (zero-page.rst).
ACPI_RSDP_ADDR = (0x070, "<Q")
E820_ENTRIES = (0x1E8, "<B")
E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
E820_ENTRY = struct.Struct("<QQI")  # addr, size, type (struct boot_e820_entry)


class LinuxBoot:
    """Boot the Linux `kernel` (vmlinux ELF or bzImage) with `initrd` and `cmdline`.

    `unpack` (bzImage only): decompress the payload here and load the ELF inside it, so no
    decompressor runs in the guest; otherwise load the protected-mode kernel at pref_address
    and let it decompress itself. `acpi`: give the guest acpi_rsdp_addr = memmap.ACPI_BASE,
    where the VMM writes the ACPI tables (boot sources with `platform` get them); without it
    the kernel finds the RSDP by scanning the BIOS area. Raises BootError naming the file."""

    def __init__(
        self,
        kernel: Path,
        initrd: Path | None = None,
        cmdline: str = "",
        *,
        unpack: bool = True,
        acpi: bool = True,
    ) -> None:
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = cmdline
        self.unpack = unpack
        self.acpi = acpi
        self._header = b""
        self._image = ElfImage((), 0, ())
        self._initrd = b""
        self.initrd_address = 0
        self.loaded_end = 0

    @property
    def description(self) -> str:
        return f"Linux kernel {self.kernel}"

    @property
    def platform(self) -> bool:
        return True

    # -- check: every input read and validated before any KVM object exists ----------------
    def check(self, shape: GuestShape) -> None:
        image = read_file(self.kernel, "Linux kernel", shape.memory_size)
        if image.startswith(b"\x7fELF"):
            self._read_elf(image, "")
            self._header = _vmlinux_header()
        elif bz.is_bzimage(image):
            bzimage = bz.BzImage.parse(self.kernel, image)
            self._header = bzimage.header
            if self.unpack:
                self._read_elf(bzimage.payload(), " (the bzImage's payload)")
            else:
                load = bzimage.load_address
                memsz = max(len(bzimage.kernel), bzimage.init_size)
                segment = Segment(load, bzimage.kernel, memsz)
                self._image = ElfImage((segment,), load + ENTRY_64_OFFSET, ())
        else:
            raise BootError(
                f"Linux kernel {self.kernel}: neither an ELF vmlinux nor a bzImage (no ELF"
                " magic, no 'HdrS' setup header at 0x202)"
            )
        low_end = ram_ranges(shape.memory_size)[0].end
        self._check_segments(low_end)
        self._check_cmdline()
        self._place_initrd(shape.memory_size, low_end)

    def _read_elf(self, image: bytes, what: str) -> None:
        name = f"Linux kernel {self.kernel}{what}"
        self._image = read_elf(image, name, ("EM_X86_64",), 64, "an x86-64 kernel")

    def _check_segments(self, low_end: int) -> None:
        for seg in self._image.segments:
            if seg.address < HIGH_MEMORY_START:
                raise BootError(
                    f"Linux kernel {self.kernel}: loads at {seg.address:#x}, below 1 MiB, over"
                    f" the boot data and the firmware tables (ACPI at {ACPI_BASE:#x})"
                )
            if seg.end > low_end:
                raise BootError(
                    f"Linux kernel {self.kernel}: {seg.memsz} bytes at {seg.address:#x} lie"
                    f" beyond guest RAM below the 32-bit hole ({low_end:#x})"
                )
        self.loaded_end = max(s.end for s in self._image.segments)

    def _check_cmdline(self) -> None:
        encoded = self.cmdline.encode()
        limit = self._field(bz.CMDLINE_SIZE)
        if len(encoded) > limit:
            raise BootError(
                f"Linux kernel {self.kernel}: command line of {len(encoded)} bytes is over the"
                f" kernel's limit of {limit} (cmdline_size)"
            )
        if b"\0" in encoded:
            raise BootError(f"Linux kernel {self.kernel}: command line contains a NUL byte")

    def _place_initrd(self, memory_size: int, low_end: int) -> None:
        """The initrd page-aligned at the top of low RAM, below initrd_addr_max."""
        self._initrd, self.initrd_address = b"", 0
        if self.initrd is None:
            return
        data = read_file(self.initrd, "initrd", memory_size)
        top = min(low_end, self._field(bz.INITRD_ADDR_MAX) + 1)
        address = (top - len(data)) // PAGE * PAGE
        kernel_end = align_up(self.loaded_end, PAGE)
        if address < kernel_end:
            raise BootError(
                f"initrd {self.initrd}: {len(data)} bytes do not fit between the kernel's end"
                f" ({kernel_end:#x}) and {top:#x} (top of low RAM or initrd_addr_max)"
            )
        self._initrd, self.initrd_address = data, address
        self.loaded_end = max(self.loaded_end, address + len(data))

    def _field(self, spec: tuple[int, str]) -> int:
        """A field of the kernel's setup header by its absolute offset."""
        return bz.field(self._header, (spec[0] - bz.SETUP_HEADER_OFFSET, spec[1]))

    # -- load: guest memory ---------------------------------------------------------------------
    def load(self, memory: GuestMemory, shape: GuestShape) -> None:
        for seg in self._image.segments:
            memory.write(seg.address, seg.data + bytes(seg.memsz - len(seg.data)))
        memory.write(GDT_BASE, GDT)
        memory.write(PML4, identity_page_tables(PML4))
        memory.write(COMMAND_LINE, self.cmdline.encode() + b"\0")
        if self._initrd:
            memory.write(self.initrd_address, self._initrd)
        memory.write(
            ZERO_PAGE,
            zero_page(
                self._header,
                cmd_line_ptr=COMMAND_LINE,
                ramdisk=(self.initrd_address, len(self._initrd)),
                acpi_rsdp_addr=ACPI_BASE if self.acpi else 0,
                e820=e820_map(shape.memory_size),
            ),
        )

    def setup_vcpu(self, vcpu: Vcpu, shape: GuestShape) -> None:
        vcpu.set_virtual_wire()
        vcpu.set_fpu()
        if vcpu.id != 0:
            return  # application processors wait for INIT/SIPI from the kernel
        sregs = vcpu.sregs()
        long_mode_flat(sregs, BOOT_CS, BOOT_DS, PML4, (GDT_BASE, len(GDT) - 1))
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs_at(self._image.entry, rsi=ZERO_PAGE, rsp=BOOT_STACK_TOP))
        vcpu.set_mp_state(kvm_abi.KVM_MP_STATE_RUNNABLE)

    def symbolize(self, address: int) -> str:
        return self._image.symbolize(address)


def identity_page_tables(base: int) -> bytes:
    """PML4 at `base`, a PDPT and four page directories on the following pages, mapping the
    first 4 GiB 1:1 with 2 MiB pages (Intel SDM vol. 3A §4.5, Figure 4-9)."""
    pdpt, pd = base + PAGE, base + 2 * PAGE
    directories = IDENTITY_MAPPED // (512 * LARGE_PAGE)
    pml4 = struct.pack("<Q", pdpt | PTE_PRESENT | PTE_WRITE).ljust(PAGE, b"\0")
    pdpt_page = b"".join(
        struct.pack("<Q", (pd + i * PAGE) | PTE_PRESENT | PTE_WRITE) for i in range(directories)
    ).ljust(PAGE, b"\0")
    flags = PTE_PRESENT | PTE_WRITE | PTE_LARGE
    pds = b"".join(
        struct.pack("<Q", i * LARGE_PAGE | flags) for i in range(IDENTITY_MAPPED // LARGE_PAGE)
    )
    return pml4 + pdpt_page + pds


def _vmlinux_header() -> bytes:
    """A setup header for a kernel that brings none (boot.rst defaults for protocol 2.15)."""
    header = bytearray(HEADER_END - bz.SETUP_HEADER_OFFSET)

    def put(spec: tuple[int, str], value: int) -> None:
        struct.pack_into(spec[1], header, spec[0] - bz.SETUP_HEADER_OFFSET, value)

    put(bz.BOOT_FLAG, BOOT_FLAG)
    put(bz.JUMP_END, HEADER_END - bz.HEADER_MAGIC_OFFSET)
    magic = bz.HEADER_MAGIC_OFFSET - bz.SETUP_HEADER_OFFSET
    header[magic : magic + 4] = bz.HEADER_MAGIC
    put(bz.VERSION, VMLINUX_VERSION)
    put(bz.LOADFLAGS, LOADED_HIGH)
    put(bz.INITRD_ADDR_MAX, DEFAULT_INITRD_ADDR_MAX)
    put(bz.KERNEL_ALIGNMENT, LARGE_PAGE)
    put(bz.XLOADFLAGS, bz.XLF_KERNEL_64)
    put(bz.CMDLINE_SIZE, COMMAND_LINE_SIZE - 1)
    return bytes(header)


def zero_page(
    header: bytes,
    cmd_line_ptr: int,
    ramdisk: tuple[int, int],
    acpi_rsdp_addr: int,
    e820: tuple[E820Entry, ...],
) -> bytes:
    """`struct boot_params` (4 KiB): `header` (the setup header from 0x1F1) with the loader's
    fields filled in (boot.rst "Details of Header Fields": type_of_loader, loadflags
    LOADED_HIGH, cmd_line_ptr, ramdisk_image/ramdisk_size, all below 4 GiB), acpi_rsdp_addr
    (0 for none) and the E820 table. Raises ValueError beyond 128 E820 entries."""
    if len(e820) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(e820)} E820 entries: the zero page holds {E820_MAX_ENTRIES}")
    page = bytearray(PAGE)
    page[bz.SETUP_HEADER_OFFSET : bz.SETUP_HEADER_OFFSET + len(header)] = header

    def put(spec: tuple[int, str], value: int) -> None:
        struct.pack_into(spec[1], page, spec[0], value)

    put(bz.BOOT_FLAG, BOOT_FLAG)
    put(bz.TYPE_OF_LOADER, TYPE_OF_LOADER_UNDEFINED)
    put(bz.LOADFLAGS, page[bz.LOADFLAGS[0]] | LOADED_HIGH)
    put(bz.CMD_LINE_PTR, cmd_line_ptr)
    put(bz.RAMDISK_IMAGE, ramdisk[0])
    put(bz.RAMDISK_SIZE, ramdisk[1])
    put(ACPI_RSDP_ADDR, acpi_rsdp_addr)
    put(E820_ENTRIES, len(e820))
    for i, entry in enumerate(e820):
        E820_ENTRY.pack_into(
            page, E820_TABLE + i * E820_ENTRY.size, entry.start, entry.size, entry.type
        )
    return bytes(page)
