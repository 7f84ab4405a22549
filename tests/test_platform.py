"""The VMM's platform pieces on their own: buses, the 8250 UART, fw_cfg, pc-testdev, GSI
routing, the memory map, and the Multiboot loader's refusals of bad input (before any KVM
object exists, so nothing is left behind)."""

import os
import struct
from pathlib import Path
from typing import Any

import pytest

from spanvm.vmm import memmap
from spanvm.vmm.boot import BootError, GuestShape
from spanvm.vmm.boot.multiboot import HEADER_MAGIC, MultibootBoot
from spanvm.vmm.bus import Bus, BusError
from spanvm.vmm.console import Console
from spanvm.vmm.devices import fw_cfg, testdev, uart
from spanvm.vmm.machine import Machine, VmConfig, VmError

MiB = 1 << 20
NO_VCPU: Any = None


class FakeHost:
    """A DeviceHost that records what devices asked for."""

    def __init__(self) -> None:
        self.console = Console()
        self.irqs: list[tuple[int, bool]] = []

    def set_irq_line(self, irq: int, level: bool) -> None:
        self.irqs.append((irq, level))


def test_bus_finds_devices_by_address_and_refuses_overlaps() -> None:
    bus = Bus("port")
    a, b = object(), object()
    bus.register(0x3F8, 8, a, "COM1")  # type: ignore[arg-type]
    bus.register(0x510, 2, b, "fw_cfg")  # type: ignore[arg-type]
    found = bus.find(0x3FD)
    assert found is not None and found.device is a and found.name == "COM1"
    assert bus.find(0x400) is None and bus.find(0x3F7) is None
    with pytest.raises(BusError, match="0x3fc\\+0x8 \\(other\\) overlaps COM1 at 0x3f8"):
        bus.register(0x3FC, 8, object(), "other")  # type: ignore[arg-type]
    with pytest.raises(BusError, match="overlaps fw_cfg"):
        bus.register(0x50F, 2, object(), "other")  # type: ignore[arg-type]


def test_uart_transmits_to_the_console_and_passes_the_8250_probe() -> None:
    host = FakeHost()
    com = uart.Uart(host)  # type: ignore[arg-type]
    for ch in b"hi\n":
        assert com.read(NO_VCPU, uart.LSR, 1) & uart.LSR_THRE  # transmitter always ready
        com.write(NO_VCPU, uart.RBR_THR_DLL, 1, ch)
    assert host.console.text == "hi\n"
    com.write(NO_VCPU, uart.SCR, 1, 0xA5)  # scratch register reads back
    assert com.read(NO_VCPU, uart.SCR, 1) == 0xA5
    com.write(NO_VCPU, uart.MCR, 1, uart.MCR_LOOP | uart.MCR_OUT2 | uart.MCR_RTS)
    assert com.read(NO_VCPU, uart.MSR, 1) & 0xF0 == 0x90  # Linux's loopback check
    com.write(NO_VCPU, uart.RBR_THR_DLL, 1, ord("x"))  # loopback: not on the console
    assert host.console.text == "hi\n"
    com.write(NO_VCPU, uart.IIR_FCR, 1, 0xE7)  # FIFO enable: a 16550A reports 0xC0
    assert com.read(NO_VCPU, uart.IIR_FCR, 1) & 0xC0 == 0xC0
    com.write(NO_VCPU, uart.LCR, 1, uart.LCR_DLAB)
    com.write(NO_VCPU, uart.RBR_THR_DLL, 1, 1)  # divisor latch: 115200 baud
    assert com.read(NO_VCPU, uart.RBR_THR_DLL, 1) == 1 and host.console.text == "hi\n"


def test_uart_receives_fed_bytes_and_raises_irq4_while_data_waits() -> None:
    host = FakeHost()
    com = uart.Uart(host)  # type: ignore[arg-type]
    com.feed(b"ab")  # no interrupt enabled: data waits, no IRQ
    assert host.irqs == [] and com.read(NO_VCPU, uart.LSR, 1) & uart.LSR_DR
    com.write(NO_VCPU, uart.IER_DLM, 1, uart.IER_RDA)
    assert host.irqs == [(4, True)]
    assert com.read(NO_VCPU, uart.IIR_FCR, 1) & 0x0F == uart.IIR_RDA
    assert com.read(NO_VCPU, uart.RBR_THR_DLL, 1) == ord("a")
    assert com.read(NO_VCPU, uart.RBR_THR_DLL, 1) == ord("b")
    assert host.irqs[-1] == (4, False)
    assert not com.read(NO_VCPU, uart.LSR, 1) & uart.LSR_DR
    assert com.read(NO_VCPU, uart.IIR_FCR, 1) & 0x0F == uart.IIR_NONE


def test_uart_thre_interrupt_is_raised_by_enabling_and_cleared_by_reading_iir() -> None:
    host = FakeHost()
    com = uart.Uart(host)  # type: ignore[arg-type]
    com.write(NO_VCPU, uart.IER_DLM, 1, uart.IER_THRE)
    assert host.irqs == [(4, True)]
    assert com.read(NO_VCPU, uart.IIR_FCR, 1) & 0x0F == uart.IIR_THRE
    assert host.irqs == [(4, True), (4, False)]
    com.write(NO_VCPU, uart.RBR_THR_DLL, 1, ord("z"))  # each byte sent: THRE again
    assert host.irqs[-1] == (4, True) and host.console.text == "z"


def test_fw_cfg_serves_the_keys_kvm_unit_tests_reads() -> None:
    dev = fw_cfg.FwCfg(fw_cfg.standard_items(256 * MiB, 3))

    def item(key: int, size: int) -> bytes:
        dev.write(NO_VCPU, 0, 2, key)
        return bytes(dev.read(NO_VCPU, 1, 1) for _ in range(size))

    assert item(fw_cfg.FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert struct.unpack("<H", item(fw_cfg.FW_CFG_NB_CPUS, 2)) == (3,)
    assert struct.unpack("<Q", item(fw_cfg.FW_CFG_RAM_SIZE, 8)) == (256 * MiB,)
    assert struct.unpack("<Q", item(fw_cfg.FW_CFG_MAX_RAM, 8)) == (0,)
    assert item(0x1234, 4) == bytes(4)  # unknown keys read as zeros


def test_testdev_scratch_reads_back_per_byte_lane_and_irq_ports_drive_lines() -> None:
    scratch = testdev.TestScratch()
    scratch.write(NO_VCPU, 0, 4, 0x11223344)
    assert scratch.read(NO_VCPU, 0, 4) == 0x11223344
    scratch.write(NO_VCPU, 0, 1, 0xAA)
    assert scratch.read(NO_VCPU, 0, 2) == 0x33AA and scratch.read(NO_VCPU, 0, 4) == 0x112233AA
    host = FakeHost()
    lines = testdev.TestIrqLines(host)  # type: ignore[arg-type]
    lines.write(NO_VCPU, 11, 4, 1)
    lines.write(NO_VCPU, 11, 4, 0)
    assert host.irqs == [(11, True), (11, False)]


def test_e820_map_reports_ram_around_the_bios_area_and_the_32bit_hole() -> None:
    entries = memmap.e820_map(3584 * MiB)
    assert [(e.start, e.end, e.type) for e in entries] == [
        (0, 0x9FC00, memmap.E820Type.RAM),
        (0x9FC00, 0x100000, memmap.E820Type.RESERVED),
        (0x100000, 3 << 30, memmap.E820Type.RAM),
        (4 << 30, (4 << 30) + 512 * MiB, memmap.E820Type.RAM),
    ]
    with pytest.raises(ValueError, match="below the 2 MiB minimum"):
        memmap.e820_map(MiB)


def _multiboot_header(flags: int = 0, checksum_ok: bool = True) -> bytes:
    checksum = (-(HEADER_MAGIC + flags)) & 0xFFFFFFFF
    return struct.pack("<3I", HEADER_MAGIC, flags, checksum if checksum_ok else checksum ^ 1)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\x7fELF" + bytes(200), "no Multiboot header"),
        (bytes(64) + _multiboot_header(checksum_ok=False) + bytes(64), "no Multiboot header"),
        (_multiboot_header(flags=4) + bytes(64), "requires features 0x4"),
        (_multiboot_header() + bytes(64), "not a valid ELF file"),
    ],
    ids=["no-header", "bad-checksum", "video-mode", "header-but-not-elf"],
)
def test_bad_multiboot_kernels_are_refused_naming_the_file(
    tmp_path: Path, content: bytes, needle: str
) -> None:
    kernel = tmp_path / "bad.flat"
    kernel.write_bytes(content)
    before = _open_fds()
    with pytest.raises(BootError, match=needle) as err:
        Machine(VmConfig(64 * MiB, 1, boot=MultibootBoot(kernel)))
    assert str(kernel) in str(err.value)
    assert _open_fds() == before  # no /dev/kvm, VM or vCPU fd left behind


def test_missing_kernel_and_module_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(BootError, match=f"multiboot kernel {tmp_path}/nope.flat: No such file"):
        MultibootBoot(tmp_path / "nope.flat").check(GuestShape(64 * MiB, 1))


def test_more_vcpus_than_kvm_allows_is_refused_before_any_vcpu(kut_dummy: Path) -> None:
    before = _open_fds()
    with pytest.raises(VmError, match="4097 vCPUs: this KVM allows at most"):
        Machine(VmConfig(64 * MiB, 4097, boot=MultibootBoot(kut_dummy)))
    assert _open_fds() == before


def _aout_kernel(tmp_path: Path, load_end: int, bss_end: int, entry: int) -> Path:
    """A Multiboot header with flag bit 16 (address fields) at offset 0, loaded at 1 MiB."""
    header = _multiboot_header(flags=1 << 16)
    fields = struct.pack("<5I", 0x10_0000, 0x10_0000, load_end, bss_end, entry)
    path = tmp_path / "aout.bin"
    path.write_bytes(header + fields + bytes(64))
    return path


@pytest.mark.parametrize(
    ("load_end", "bss_end", "entry", "needle"),
    [
        (0, 0, 0x5000_0000, "entry 0x50000000 lies outside the loaded image"),
        (0x0F_0000, 0, 0x10_0000, "load_end/bss_end lie before load_addr"),
    ],
    ids=["entry-outside", "end-before-start"],
)
def test_multiboot_address_fields_are_checked(
    tmp_path: Path, load_end: int, bss_end: int, entry: int, needle: str
) -> None:
    kernel = _aout_kernel(tmp_path, load_end, bss_end, entry)
    with pytest.raises(BootError, match=needle):
        MultibootBoot(kernel).check(GuestShape(64 * MiB, 1))


def test_multiboot_address_fields_cut_off_are_refused(tmp_path: Path) -> None:
    kernel = tmp_path / "short.bin"
    kernel.write_bytes(_multiboot_header(flags=1 << 16))  # 12 bytes: no address fields
    with pytest.raises(BootError, match=f"{kernel}: the header's address fields"):
        MultibootBoot(kernel).check(GuestShape(64 * MiB, 1))


def test_fw_cfg_arch_local_keys_are_not_aliased_to_common_keys() -> None:
    dev = fw_cfg.FwCfg(fw_cfg.standard_items(256 * MiB, 3))
    dev.write(NO_VCPU, 0, 2, 0x8000 | fw_cfg.FW_CFG_RAM_SIZE)  # an arch-local key, not 0x03
    assert bytes(dev.read(NO_VCPU, 1, 1) for _ in range(8)) == bytes(8)
