"""The Linux 64-bit boot protocol (vmm/boot/linux.py): a ring-0 test kernel of our own
(payloads/src/zeropage_probe.c) prints the zero page it was handed, and the test compares it
with what the VMM meant to give; bad kernels, initrds and command lines are refused before
any KVM object exists."""

import gzip
import lzma
import random
import struct
from pathlib import Path

import pytest

from spanvm.payloads.kernels import kernel_path
from spanvm.vmm.boot import BootError
from spanvm.vmm.boot.linux import COMMAND_LINE, ZERO_PAGE, LinuxBoot, identity_page_tables
from spanvm.vmm.machine import Machine, VmConfig
from spanvm.vmm.memmap import ACPI_BASE, LARGE_PAGE, e820_map
from spanvm.vmm.platform_shape import NumaNode

pytestmark = pytest.mark.kvm
MiB = 1 << 20
MEMORY = 64 * MiB
CMDLINE = "console=ttyS0 spanvm.probe=1 quoted='a b'"


def fnv1a(data: bytes) -> int:
    value = 2166136261
    for byte in data:
        value = ((value ^ byte) * 16777619) & 0xFFFF_FFFF
    return value


def boot(boot_source: LinuxBoot, vcpus: int = 1) -> dict[str, list[str]]:
    """Run the probe; its lines by first word (value: the rest of each such line)."""
    with Machine(VmConfig(MEMORY, vcpus, boot=boot_source)) as machine:
        result = machine.run(idle_timeout=60)
    assert result.ok, (result.error, result.console)
    facts: dict[str, list[str]] = {}
    for line in result.console.splitlines():
        key, _, rest = line.partition(" ")
        facts.setdefault(key, []).append(rest)
    assert facts["done"] == [""]
    return facts


def expected_e820() -> list[str]:
    return [
        f"{i:#x} {e.start:#x} {e.size:#x} {int(e.type):#x}" for i, e in enumerate(e820_map(MEMORY))
    ]


@pytest.fixture
def initrd(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(19).randbytes(5000)
    path = tmp_path / "initrd.img"
    path.write_bytes(data)
    return path, data


def test_probe_kernel_reads_the_zero_page_the_vmm_wrote(initrd: tuple[Path, bytes]) -> None:
    path, data = initrd
    source = LinuxBoot(kernel_path("zeropage-probe"), path, CMDLINE)
    facts = boot(source, vcpus=2)  # vCPU 1 waits for a SIPI that never comes
    assert facts["entry"] == ["cs 0x10 rflags 0x2"]  # __BOOT_CS, interrupts off
    assert facts["zeropage"] == [f"{ZERO_PAGE:#x}"]
    assert facts["boot_flag"] == ["0xaa55"]
    assert facts["header"] == ["0x53726448"]  # "HdrS"
    assert facts["version"] == ["0x20f"]
    assert facts["type_of_loader"] == ["0xff"]
    assert facts["loadflags"] == ["0x1"]  # LOADED_HIGH
    assert facts["cmdline_size"] == ["0x7ff"]
    assert facts["cmdline"] == [CMDLINE]
    assert facts["e820"] == expected_e820()
    top = MEMORY  # the initrd sits page-aligned at the top of low RAM
    address = (top - len(data)) // 4096 * 4096
    assert source.initrd_address == address
    assert facts["initrd"] == [f"{address:#x} {len(data):#x} fnv1a {fnv1a(data):#x}"]
    assert facts["acpi_rsdp"] == [f"{ACPI_BASE:#x}"]
    assert facts["acpi_rsdp_signature"] == ["RSD PTR "]  # the VMM wrote its tables there


def test_probe_kernel_without_initrd_or_acpi() -> None:
    facts = boot(LinuxBoot(kernel_path("zeropage-probe"), None, "", acpi=False))
    assert facts["cmdline"] == [""]
    assert facts["initrd"] == ["0x0 0x0 fnv1a 0x811c9dc5"]  # FNV-1a of nothing
    assert facts["acpi_rsdp"] == ["0x0"] and "acpi_rsdp_signature" not in facts


# -- bzImages made around the probe kernel ------------------------------------------------------
def elf_segment(path: Path) -> tuple[int, bytes, int]:
    """The probe's one PT_LOAD segment: (paddr, file bytes, memsz)."""
    image = path.read_bytes()
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", image, 0x20)[0],
        *struct.unpack_from("<HH", image, 0x36),
    )
    for i in range(phnum):
        p_type, _, offset, _, paddr, filesz, memsz = struct.unpack_from(
            "<IIQQQQQ", image, phoff + i * phentsize
        )
        if p_type == 1:
            return paddr, image[offset : offset + filesz], memsz
    raise AssertionError("no PT_LOAD")


def bzimage(
    kernel: bytes,
    *,
    version: int = 0x020F,
    xloadflags: int = 1,
    cmdline_size: int = 4095,
    payload: tuple[int, int] | None = None,
    pref_address: int = 0x100_0000,
    init_size: int = 0,
) -> bytes:
    """A bzImage as the kernel build lays it out: 4 setup sectors (setup_sects = 4) after the
    boot sector, the setup header at 0x1F1, then the protected-mode `kernel`."""
    setup = bytearray(5 * 512)
    struct.pack_into("<B", setup, 0x1F1, 4)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    struct.pack_into("<BB", setup, 0x200, 0xEB, 0x6A)  # jmp: the header ends at 0x26C
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<I", setup, 0x22C, 0x7FFF_FFFF)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<II", setup, 0x248, *(payload or (0, 0)))
    struct.pack_into("<QI", setup, 0x258, pref_address, init_size)
    return bytes(setup) + kernel


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress], ids=["gzip", "xz"])
def test_bzimage_payload_is_unpacked_in_the_vmm(tmp_path: Path, compress: object) -> None:
    assert callable(compress)
    elf = kernel_path("zeropage-probe").read_bytes()
    payload = compress(elf) + struct.pack("<I", len(elf))  # the kernel's size_append
    stub = b"\xf4" * 0x400  # the decompressor's place: must never run
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(stub + payload, payload=(len(stub), len(payload))))
    facts = boot(LinuxBoot(path, None, "x" * 4095))
    assert facts["cmdline_size"] == ["0xfff"]  # the bzImage's own header reached the guest
    assert facts["cmdline"] == ["x" * 4095]
    assert facts["version"] == ["0x20f"] and facts["type_of_loader"] == ["0xff"]


def test_bzimage_without_unpacking_enters_at_0x200(tmp_path: Path) -> None:
    address, code, memsz = elf_segment(kernel_path("zeropage-probe"))
    load = address - 0x200  # the probe's _start is then the bzImage's 64-bit entry
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(bytes(0x200) + code, pref_address=load, init_size=0x200 + memsz))
    facts = boot(LinuxBoot(path, None, "in place", unpack=False))
    assert facts["cmdline"] == ["in place"]
    assert facts["e820"] == expected_e820()


# -- bad input: refused before KVM, naming the file and the reason -----------------------------
def refused(source: LinuxBoot, memory: int = MEMORY) -> str:
    with pytest.raises(BootError) as err:
        Machine(VmConfig(memory, 1, boot=source, device="/nonexistent/kvm"))
    return str(err.value)  # the device does not exist: the error came before opening it


def elf64(paddr: int, entry: int, machine: int = 62, size: int = 16) -> bytes:
    """A minimal ELF64 executable with one PT_LOAD of `size` bytes at `paddr`."""
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 120, paddr, paddr, size, size, 0x1000)
    return header + phdr + b"\xf4" * size


def test_refuses_a_file_that_is_neither_elf_nor_bzimage(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"just text\n" * 100)
    message = refused(LinuxBoot(path))
    assert str(path) in message and "neither an ELF vmlinux nor a bzImage" in message


def test_refuses_a_missing_kernel(tmp_path: Path) -> None:
    message = refused(LinuxBoot(tmp_path / "nope"))
    assert f"Linux kernel {tmp_path / 'nope'}: No such file" in message


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"version": 0x0206}, "boot protocol 2.06 is too old for the 64-bit entry (needs 2.12"),
        ({"xloadflags": 0}, "lacks XLF_KERNEL_64"),
    ],
)
def test_refuses_bzimages_without_a_64bit_entry(
    tmp_path: Path, kwargs: dict[str, int], reason: str
) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(b"\xf4" * 4096, **kwargs))
    message = refused(LinuxBoot(path))
    assert message.startswith(f"Linux kernel {path}: ") and reason in message


def test_refuses_a_payload_it_cannot_unpack(tmp_path: Path) -> None:
    lz4 = b"\x02\x21\x4c\x18" + bytes(60)
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(lz4, payload=(0, len(lz4))))
    message = refused(LinuxBoot(path))
    assert str(path) in message and "compressed with lz4" in message


def test_refuses_a_command_line_over_the_kernels_limit(tmp_path: Path) -> None:
    vmlinux = kernel_path("zeropage-probe")
    message = refused(LinuxBoot(vmlinux, None, "y" * 2048))
    assert f"Linux kernel {vmlinux}: command line of 2048 bytes" in message
    assert "limit of 2047 (cmdline_size)" in message
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(b"\xf4" * 4096, cmdline_size=16))
    assert "limit of 16" in refused(LinuxBoot(path, None, "z" * 17, unpack=False))


def test_refuses_an_initrd_larger_than_memory(tmp_path: Path) -> None:
    big = tmp_path / "big.cpio"
    with big.open("wb") as f:
        f.truncate(MEMORY + 1)  # sparse: nothing is read
    message = refused(LinuxBoot(kernel_path("zeropage-probe"), big))
    assert message == f"initrd {big}: {MEMORY + 1} bytes do not fit in {MEMORY} bytes"


def test_refuses_an_initrd_that_would_overlap_the_kernel(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(MEMORY - 16 * MiB))  # fits in RAM, not above the kernel at 16 MiB
    message = refused(LinuxBoot(kernel_path("zeropage-probe"), initrd))
    assert message.startswith(f"initrd {initrd}: ") and "do not fit between the kernel" in message


@pytest.mark.parametrize(
    ("paddr", "reason"),
    [
        (0xE_0000, "below 1 MiB, over the boot data and the firmware tables"),
        (MEMORY - 8, "beyond guest RAM"),
    ],
)
def test_refuses_kernels_over_reserved_or_missing_memory(
    tmp_path: Path, paddr: int, reason: str
) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(elf64(paddr, paddr))
    message = refused(LinuxBoot(path))
    assert message.startswith(f"Linux kernel {path}: ") and reason in message


def test_refuses_non_x86_64_elf_and_entries_outside_the_image(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(elf64(0x100_0000, 0x100_0000, machine=183))  # EM_AARCH64
    assert "not an x86-64 kernel" in refused(LinuxBoot(path))
    path.write_bytes(elf64(0x100_0000, 0x200_0000))
    assert "entry 0x2000000 lies in no loadable segment" in refused(LinuxBoot(path))


def test_identity_page_tables_map_the_first_4_gib() -> None:
    tables = identity_page_tables(0x9000)
    pml4_0, pdpt_3 = (
        struct.unpack_from("<Q", tables, 0)[0],
        struct.unpack_from("<Q", tables, 4096 + 24)[0],
    )
    assert pml4_0 == 0xA000 | 3 and pdpt_3 == 0xE000 | 3
    last = struct.unpack_from("<Q", tables, len(tables) - 8)[0]
    assert last == (4 << 30) - (2 << 20) | 0x83
    assert COMMAND_LINE + 4096 < 0x9_FC00  # the command line stays below the EBDA


def test_probe_kernel_sees_every_vcpu_in_the_madt_and_each_fragment_as_a_numa_node() -> None:
    """Three fragments' worth of NUMA nodes (vCPUs 0 | 1-2 | 3, memory split in three), as
    the fabric would hand them; the guest walks RSDP -> XSDT -> MADT/SRAT/SLIT itself."""
    third = MEMORY // 3 // LARGE_PAGE * LARGE_PAGE
    nodes = (
        NumaNode(0, (0,), ((0, third),)),
        NumaNode(1, (1, 2), ((third, 2 * third),)),
        NumaNode(2, (3,), ((2 * third, MEMORY),)),
    )
    source = LinuxBoot(kernel_path("zeropage-probe"), None, "")
    with Machine(VmConfig(MEMORY, 4, boot=source, nodes=nodes)) as machine:
        result = machine.run(idle_timeout=60)
    assert result.ok, (result.error, result.console)
    lines = result.console.splitlines()
    tables = [line.split()[1] for line in lines if line.startswith("acpi_table ")]
    assert set(tables) >= {"FACP", "APIC", "SRAT", "SLIT"}
    assert [ln for ln in lines if ln.startswith("madt lapic")] == [
        f"madt lapic {apic:#x} 0x1"
        for apic in range(4)  # every vCPU, enabled
    ]
    assert "madt ioapic 0x0 0xfec00000 0x0" in lines
    assert "madt override 0x0 0x2 0x0" in lines  # the PIT's IRQ 0 on GSI 2
    assert [ln for ln in lines if ln.startswith("srat cpu")] == [
        f"srat cpu {apic:#x} {node:#x} 0x1" for apic, node in ((0, 0), (1, 1), (2, 1), (3, 2))
    ]
    assert [ln for ln in lines if ln.startswith("srat memory")] == [
        f"srat memory {n:#x} {start:#x} {end - start:#x} 0x1"
        for n, start, end in ((0, 0, third), (1, third, 2 * third), (2, 2 * third, MEMORY))
    ]
    assert [ln for ln in lines if ln.startswith("slit")] == [
        "slit 0xa 0x14 0x14",
        "slit 0x14 0xa 0x14",
        "slit 0x14 0x14 0xa",
    ]
