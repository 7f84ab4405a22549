"""Multiboot (version 0.6.96) kernels, as kvm-unit-tests builds them: an ELF32 (or ELF64)
file with a Multiboot header in its first 8 KiB, loaded by its program headers and entered in
32-bit protected mode with EAX = 0x2BADB002 and EBX = the Multiboot information structure.

Source: the Multiboot Specification 0.6.96, §3.1 (header: magic 0x1BADB002, flags,
checksum; flags bits 0-15 are requirements the loader must meet), §3.2 (machine state),
§3.3 (boot information: mem_lower/mem_upper in KiB, cmdline, mods, mmap entries of
size/base/length/type). ELF parsing by pyelftools. Application processors are left waiting
for INIT/SIPI (KVM's reset state for vCPUs other than 0 with the in-kernel LAPIC).
"""

import struct
from pathlib import Path

from spanvm.vmm import kvm_abi
from spanvm.vmm.boot import BootError, GuestShape, read_file
from spanvm.vmm.boot.cpu_state import protected_mode_flat, regs_at
from spanvm.vmm.boot.elf import ElfImage, Segment, read_elf
from spanvm.vmm.memmap import EBDA_START, HIGH_MEMORY_START, PAGE, align_up, e820_map, ram_ranges
from spanvm.vmm.memory import GuestMemory
from spanvm.vmm.vcpu import Vcpu

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
HEADER_SEARCH = 8192
FLAG_PAGE_ALIGN, FLAG_MEMORY_INFO, FLAG_VIDEO_MODE, FLAG_AOUT_KLUDGE = 1, 2, 4, 1 << 16
SUPPORTED_REQUIREMENTS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO
INFO_MEMORY, INFO_CMDLINE, INFO_MODS, INFO_MMAP = 1 << 0, 1 << 2, 1 << 3, 1 << 6
INFO_LOADER_NAME = 1 << 9
INFO_BASE = 0x9_0000  # the boot information and its strings: conventional memory, below EBDA
INFO_SIZE = 116
CODE_SELECTOR, DATA_SELECTOR = 0x10, 0x18
LOADER_NAME = b"spanvm\0"


class MultibootBoot:
    """Boot `kernel` with `cmdline` and `modules` (each loaded page-aligned after the kernel,
    with its file name as the module string). Raises BootError naming the file."""

    def __init__(self, kernel: Path, cmdline: str = "", modules: tuple[Path, ...] = ()) -> None:
        self.kernel = kernel
        self.cmdline = cmdline
        self.modules = modules
        self._image = ElfImage((), 0, ())
        self._module_bytes: list[bytes] = []

    @property
    def description(self) -> str:
        return f"multiboot kernel {self.kernel}"

    @property
    def platform(self) -> bool:
        return True

    def check(self, shape: GuestShape) -> None:
        image = read_file(self.kernel, "multiboot kernel", shape.memory_size)
        self._parse(image)
        low_end = ram_ranges(shape.memory_size)[0].end
        for seg in self._image.segments:
            if seg.address < HIGH_MEMORY_START and seg.address + seg.memsz > INFO_BASE:
                raise BootError(
                    f"multiboot kernel {self.kernel}: segment at {seg.address:#x} overlaps the"
                    f" boot information at {INFO_BASE:#x}-{EBDA_START:#x}"
                )
            if seg.address + seg.memsz > low_end:
                raise BootError(
                    f"multiboot kernel {self.kernel}: segment at {seg.address:#x}"
                    f" ({seg.memsz} bytes) lies beyond guest RAM ({low_end:#x})"
                )
        end = self._modules_start()
        self._module_bytes = []
        for path in self.modules:
            data = read_file(path, "multiboot module", shape.memory_size)
            end = align_up(end, PAGE) + len(data)
            if end > low_end:
                raise BootError(f"multiboot module {path}: does not fit in guest RAM")
            self._module_bytes.append(data)
        strings = (
            len(self.cmdline) + 1 + len(LOADER_NAME) + sum(len(str(p)) + 1 for p in self.modules)
        )
        mmap = 24 * len(e820_map(shape.memory_size))
        if INFO_SIZE + 16 * len(self.modules) + mmap + strings > EBDA_START - INFO_BASE:
            raise BootError(
                f"multiboot command line and module names: over {EBDA_START - INFO_BASE} bytes"
            )

    def _parse(self, image: bytes) -> None:
        offset = _find_header(image)
        if offset is None:
            raise BootError(
                f"multiboot kernel {self.kernel}: no Multiboot header (magic {HEADER_MAGIC:#x}"
                f" with a valid checksum) in its first {HEADER_SEARCH} bytes"
            )
        flags = struct.unpack_from("<I", image, offset + 4)[0]
        unsupported = flags & 0xFFFF & ~SUPPORTED_REQUIREMENTS
        if unsupported:
            raise BootError(
                f"multiboot kernel {self.kernel}: header requires features {unsupported:#x}"
                " this loader does not provide (video mode)"
            )
        if flags & FLAG_AOUT_KLUDGE:
            self._parse_aout(image, offset)
        else:
            self._parse_elf(image)

    def _parse_aout(self, image: bytes, offset: int) -> None:
        """Flag bit 16: the header's own address fields (§3.1.3) say what to load where."""
        name = f"multiboot kernel {self.kernel}"
        if offset + 32 > len(image):
            raise BootError(f"{name}: the header's address fields (flag bit 16) are cut off")
        header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from(
            "<5I", image, offset + 12
        )
        start = offset - (header_addr - load_addr)
        if start < 0 or load_addr > header_addr:
            raise BootError(f"{name}: header_addr/load_addr are inconsistent")
        if (load_end and load_end < load_addr) or (bss_end and bss_end < max(load_end, load_addr)):
            raise BootError(f"{name}: load_end/bss_end lie before load_addr")
        end = len(image) if load_end == 0 else start + (load_end - load_addr)
        data = image[start:end]
        memsz = max(len(data), (bss_end - load_addr) if bss_end else 0)
        if not load_addr <= entry < load_addr + memsz:
            raise BootError(f"{name}: entry {entry:#x} lies outside the loaded image")
        self._image = ElfImage((Segment(load_addr, data, memsz),), entry, ())

    def _parse_elf(self, image: bytes) -> None:
        name = f"multiboot kernel {self.kernel}"
        self._image = read_elf(image, name, ("EM_386", "EM_X86_64"), None, "an x86 kernel")

    def _modules_start(self) -> int:
        return max(HIGH_MEMORY_START, *(s.end for s in self._image.segments))

    def load(self, memory: GuestMemory, shape: GuestShape) -> None:
        for seg in self._image.segments:
            memory.write(seg.address, seg.data + bytes(seg.memsz - len(seg.data)))
        strings = INFO_BASE + INFO_SIZE
        blob = bytearray()

        def put(data: bytes) -> int:
            address = strings + len(blob)
            blob.extend(data)
            return address

        cmdline_address = put(self.cmdline.encode() + b"\0")
        loader_address = put(LOADER_NAME)
        module_address = align_up(self._modules_start(), PAGE)
        entries = []
        for path, data in zip(self.modules, self._module_bytes, strict=True):
            memory.write(module_address, data)
            name = put(str(path).encode() + b"\0")
            entries.append(struct.pack("<4I", module_address, module_address + len(data), name, 0))
            module_address = align_up(module_address + len(data), PAGE)
        mods_address = put(b"".join(entries)) if entries else 0
        mmap = b"".join(
            struct.pack("<IQQI", 20, e.start, e.size, int(e.type))
            for e in e820_map(shape.memory_size)
        )
        mmap_address = put(mmap)
        low_end = ram_ranges(shape.memory_size)[0].end
        info = (
            struct.pack(
                "<12I",
                INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME,
                EBDA_START // 1024,  # mem_lower, KiB
                (low_end - HIGH_MEMORY_START) // 1024,  # mem_upper, KiB from 1 MiB
                0xFFFFFFFF,  # boot_device: none
                cmdline_address,
                len(entries),
                mods_address,
                0,
                0,
                0,
                0,  # syms (ELF section headers): not given
                len(mmap),
            )
            + struct.pack("<I", mmap_address)
            + bytes(12)
            + struct.pack("<I", loader_address)
        )
        memory.write(INFO_BASE, info.ljust(INFO_SIZE, b"\0") + bytes(blob))

    def setup_vcpu(self, vcpu: Vcpu, shape: GuestShape) -> None:
        if vcpu.id != 0:
            return  # application processors wait for INIT/SIPI from the guest
        sregs = vcpu.sregs()
        protected_mode_flat(sregs, CODE_SELECTOR, DATA_SELECTOR)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs_at(self._image.entry, rax=BOOTLOADER_MAGIC, rbx=INFO_BASE))
        vcpu.set_mp_state(kvm_abi.KVM_MP_STATE_RUNNABLE)

    def symbolize(self, address: int) -> str:
        return self._image.symbolize(address)


def _find_header(image: bytes) -> int | None:
    for offset in range(0, min(len(image), HEADER_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<3I", image, offset)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return offset
    return None
