"""The PC platform around the vCPUs: which device sits where on the port and MMIO buses (one
line per device), and how a KVM exit that stops a vCPU is described.

Ports: COM1 8250 UART 0x3f8 (IRQ 4), isa-debug-exit 0xf4, fw_cfg 0x510, pc-testdev 0xe0 and
0x2000-0x2017. MMIO: the spanvm doorbell at 0xD000_0000, pc-testdev's buffer at 0xFF00_0000.
The PIC (0x20, 0xa0), PIT (0x40) and the IOAPIC/LAPIC windows are KVM's in-kernel devices and
never reach these buses.
"""

import capstone

from spanvm.vmm import kvm_abi
from spanvm.vmm.acpi import build_acpi
from spanvm.vmm.boot import GuestShape
from spanvm.vmm.bus import Bus
from spanvm.vmm.devices import debug_exit, fw_cfg, testdev, uart
from spanvm.vmm.devices.doorbell import Doorbell, DoorbellHost
from spanvm.vmm.memmap import (
    ACPI_BASE,
    ACPI_LIMIT,
    DOORBELL_BASE,
    DOORBELL_SIZE,
    MPTABLE_BASE,
    MPTABLE_LIMIT,
)
from spanvm.vmm.memory import GuestMemory
from spanvm.vmm.mptable import MAX_MP_APIC_ID, build_mptable
from spanvm.vmm.platform_shape import PlatformShape
from spanvm.vmm.vcpu import Vcpu
from spanvm.vmm.vm import Vm

MAX_INSTRUCTION = 15


def attach_devices(host: DoorbellHost, io: Bus, mmio: Bus, shape: GuestShape) -> uart.Uart:
    """Register every device; returns COM1 (the console's input side)."""
    com1 = uart.Uart(host)
    io.register(uart.COM1_PORT, uart.SIZE, com1, "COM1 (8250 UART)")
    io.register(debug_exit.PORT, debug_exit.SIZE, debug_exit.DebugExit(host), "isa-debug-exit")
    items = fw_cfg.standard_items(shape.memory_size, shape.vcpu_count)
    io.register(fw_cfg.PORT, fw_cfg.SIZE, fw_cfg.FwCfg(items), "fw_cfg")
    io.register(testdev.SCRATCH_PORT, testdev.SCRATCH_SIZE, testdev.TestScratch(), "pc-testdev")
    io.register(testdev.IRQ_PORT, testdev.IRQ_LINES, testdev.TestIrqLines(host), "pc-testdev IRQs")
    mmio.register(testdev.MMIO_BASE, testdev.MMIO_SIZE, testdev.TestMmio(), "pc-testdev MMIO")
    mmio.register(DOORBELL_BASE, DOORBELL_SIZE, Doorbell(host), "spanvm doorbell")
    return com1


def platform_shape(shape: GuestShape) -> PlatformShape:
    """The firmware tables' view of the guest: its NUMA nodes and the PC interrupt wiring."""
    return PlatformShape(nodes=shape.nodes)


def route_interrupts(vm: Vm, tables: PlatformShape) -> None:
    """Route GSIs as the tables say (the PIT's IRQ 0 arrives on IOAPIC pin 2)."""
    vm.route_gsis(tables.isa_ioapic_pins(), tables.ioapic_pins)


def write_firmware_tables(memory: GuestMemory, tables: PlatformShape) -> None:
    """ACPI tables at ACPI_BASE (RSDP first) and, when every APIC id fits its 8 bits, the MP
    table at MPTABLE_BASE: both in the BIOS area Linux scans (memmap.py)."""
    acpi = build_acpi(tables, ACPI_BASE)
    if ACPI_BASE + len(acpi.blob) > ACPI_LIMIT:
        raise ValueError(f"ACPI tables of {len(acpi.blob)} bytes overflow {ACPI_LIMIT:#x}")
    memory.write(ACPI_BASE, acpi.blob)
    if max(tables.apic_ids) <= MAX_MP_APIC_ID:
        mp = build_mptable(tables, MPTABLE_BASE)
        if MPTABLE_BASE + len(mp) > MPTABLE_LIMIT:
            raise ValueError(f"MP table of {len(mp)} bytes overflows {MPTABLE_LIMIT:#x}")
        memory.write(MPTABLE_BASE, mp)


def instruction_at(vcpu: Vcpu, memory: GuestMemory) -> str:
    """The instruction at the vCPU's cs:rip, disassembled ("int3 (cc)"), or its bytes, or why
    they cannot be read. Used when KVM cannot emulate it (KVM_INTERNAL_ERROR_EMULATION)."""
    regs, sregs = vcpu.regs(), vcpu.sregs()
    linear = (sregs.cs.base + regs.rip) & 0xFFFF_FFFF_FFFF_FFFF
    gpa = vcpu.translate(linear)
    if gpa is None:
        return f"(rip {linear:#x} is not mapped)"
    try:
        code = memory.read(gpa, MAX_INSTRUCTION)
    except ValueError:
        return f"(rip {linear:#x} -> {gpa:#x} is outside guest RAM)"
    if sregs.cs.l:
        mode = capstone.CS_MODE_64
    elif sregs.cs.db and sregs.cr0 & 1:
        mode = capstone.CS_MODE_32
    else:
        mode = capstone.CS_MODE_16
    for insn in capstone.Cs(capstone.CS_ARCH_X86, mode).disasm(code, linear, 1):
        text = f"{insn.mnemonic} {insn.op_str}".strip()
        return f"{text} ({bytes(insn.bytes).hex(' ')})"
    return f"(undecodable bytes {code.hex(' ')})"


def internal_error(vcpu: Vcpu, memory: GuestMemory | None) -> str:
    """Describe KVM_EXIT_INTERNAL_ERROR: for an emulation failure, the instruction and rip."""
    internal = vcpu.exit_union(kvm_abi.KvmRunInternal)
    assert isinstance(internal, kvm_abi.KvmRunInternal)
    if internal.suberror == kvm_abi.KVM_INTERNAL_ERROR_EMULATION and memory is not None:
        regs = vcpu.regs()
        return (
            f"emulation failure: KVM cannot emulate {instruction_at(vcpu, memory)}"
            f" at rip={regs.rip:#x}"
        )
    return f"KVM_EXIT_INTERNAL_ERROR (suberror {internal.suberror})"
