"""Proxy vCPUs: how a fragment catches the IPIs its vCPUs send to vCPUs run elsewhere.

KVM's in-kernel LAPIC delivers an IPI only to vCPUs of the same VM and silently drops one
for an APIC id that does not exist there. So each fragment creates, beside its own vCPUs, a
*proxy* vCPU for every APIC id it does not run: the guest's IPIs reach it through KVM's own
delivery (physical, shorthand and broadcast destinations, local IPIs untouched on KVM's
fast path), and the proxy turns each accepted interrupt into an exit:

- It sits in KVM_MP_STATE_HALTED in 32-bit protected mode at CPL0, IF=1, with an IDT and a
  stack of its own in a private memory slot (`PROXY_AREA`, not guest RAM, not shared by the
  fabric), and with KVM's single-step guest debugging on (KVM_SET_GUEST_DEBUG).
- A fixed IPI wakes it into the IDT stub for its vector; the stub's first instruction is the
  EOI write, after which single-step exits (KVM_EXIT_DEBUG): the stub's address names the
  vector. An NMI enters a stub of its own.
- INIT resets it (KVM_MP_STATE_INIT_RECEIVED, no exit); the start-up IPI then starts it in
  real mode at the vector's page and single-step exits after one instruction: CS says the
  vector (SDM vol. 3A §8.4.4.1, CS selector = vector << 8). The INIT is carried with the
  SIPI that follows it: the in-kernel LAPIC reports nothing to userspace at an INIT.
  That one instruction of the guest's trampoline runs on the proxy (its register effects
  are discarded); trampolines begin with `cli`/`jmp`, as Linux's and kvm-unit-tests' do.
  A proxy of the boot vCPU (APIC id 0 is KVM's BSP) restarts at the reset vector instead,
  inside the proxy area: an INIT alone.

After each catch (and after sending it on) the monitor re-arms the proxy (registers, NMI
mask, LAPIC after an INIT, HALTED), so the proxy never executes `iret`, which this KVM cannot
emulate in 32-bit mode.
Sources: Documentation/virt/kvm/api.rst (KVM_SET_GUEST_DEBUG, KVM_SET_MP_STATE,
KVM_SET_VCPU_EVENTS), Intel SDM vol. 3A §6.11 (IDT gates), §3.4.5 (segment descriptors),
§10.8.5 (EOI), §11.4.7 (the reset state of the local APIC).
"""

import ctypes
import struct
from collections.abc import Callable

from spanvm.vmm import kvm_abi
from spanvm.vmm.cpuid import CpuidOptions, vcpu_cpuid
from spanvm.vmm.errors import VmError
from spanvm.vmm.interrupts import DeliveryMode, Interrupt
from spanvm.vmm.memmap import LAPIC_BASE, PROXY_AREA, PROXY_AREA_SIZE
from spanvm.vmm.vcpu import Vcpu
from spanvm.vmm.vm import Vm

# The proxy area (offsets from PROXY_AREA).
GDT_OFFSET = 0x0000  # null, flat 32-bit code (0x08), flat data (0x10)
IDT_OFFSET = 0x0800  # 256 interrupt gates
STUBS_OFFSET = 0x1000  # stub i at +8*i; the NMI stub after the 256
HALT_OFFSET = 0x2000  # where a re-armed proxy "is" (never executed: it is HALTED)
STACKS_OFFSET, STACK_SIZE = 0x3000, 0x100  # one stack per proxy
MAX_PROXIES = 128  # stacks up to 0xB000
RESET_OFFSET = 0xFFF0  # the reset vector 0xFFFFFFF0 when PROXY_AREA is 0xFFFF0000
STUB_SIZE = 8
NMI_STUB = 256
CODE_SELECTOR, DATA_SELECTOR = 0x08, 0x10
EOI_ADDRESS = LAPIC_BASE + 0xB0
APIC_SVR = 0xF0
APIC_SVR_ENABLE = 0x100
CR0_PE, CR0_ET = 0x1, 0x10
RFLAGS_IF, RFLAGS_FIXED = 0x200, 0x2
PROXY_SLOT = 8  # memory slot of the area (guest RAM uses slots 0 and 1)
APICBASE_BSP = 1 << 8
X2APIC_EOI_MSR = 0x80B


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """One 8-byte segment descriptor (SDM vol. 3A §3.4.5)."""
    return struct.pack(
        "<HHBBBB",
        limit & 0xFFFF,
        base & 0xFFFF,
        base >> 16 & 0xFF,
        access,
        flags << 4 | limit >> 16 & 0xF,
        base >> 24 & 0xFF,
    )


def _gate(offset: int) -> bytes:
    """A 32-bit interrupt gate to CODE_SELECTOR:offset, DPL 0 (SDM vol. 3A §6.11)."""
    return struct.pack("<HHBBH", offset & 0xFFFF, CODE_SELECTOR, 0, 0x8E, offset >> 16)


def area_image() -> bytes:
    """The proxy area's contents: GDT, IDT, stubs (each `mov [EOI_ADDRESS], eax`: A3 imm32,
    then `hlt`, never reached), and a `nop` at the reset vector."""
    image = bytearray(PROXY_AREA_SIZE)
    gdt = bytes(8) + _descriptor(0, 0xFFFFF, 0x9B, 0xC) + _descriptor(0, 0xFFFFF, 0x93, 0xC)
    image[GDT_OFFSET : GDT_OFFSET + len(gdt)] = gdt
    stub = b"\xa3" + struct.pack("<I", EOI_ADDRESS) + b"\xf4\x90\x90"
    for vector in range(257):
        at = STUBS_OFFSET + vector * STUB_SIZE
        image[at : at + STUB_SIZE] = stub
    for vector in range(256):
        target = NMI_STUB if vector == 2 else vector
        gate = _gate(PROXY_AREA + STUBS_OFFSET + target * STUB_SIZE)
        image[IDT_OFFSET + vector * 8 : IDT_OFFSET + vector * 8 + 8] = gate
    image[HALT_OFFSET] = 0xF4
    image[RESET_OFFSET] = 0x90
    return bytes(image)


class ProxyArea:
    """The proxies' private memory: one slot at PROXY_AREA holding `area_image()`."""

    def __init__(self, vm: Vm) -> None:
        self.host_address = kvm_abi.mmap_anonymous(PROXY_AREA_SIZE)
        image = area_image()
        ctypes.memmove(self.host_address, image, len(image))
        vm.map_region(PROXY_SLOT, PROXY_AREA, PROXY_AREA_SIZE, self.host_address)

    def read_u32(self, offset: int) -> int:
        """The 32-bit little-endian word at `offset` in the area (a proxy's stack)."""
        if not 0 <= offset <= PROXY_AREA_SIZE - 4:
            return 0
        return int.from_bytes(ctypes.string_at(self.host_address + offset, 4), "little")

    def close(self) -> None:
        """Unmap (after the VM is gone)."""
        if self.host_address:
            kvm_abi.munmap(self.host_address, PROXY_AREA_SIZE)
            self.host_address = 0


def _flat(selector: int, segment_type: int) -> kvm_abi.KvmSegment:
    return kvm_abi.KvmSegment(
        base=0, limit=0xFFFFFFFF, selector=selector, type=segment_type, present=1, dpl=0,
        db=1, s=1, l=0, g=1,
    )  # fmt: skip


class ProxyVcpu:
    """The proxy of APIC id `apic_id` in `vm`. `catch()` after each KVM_RUN return says what
    it caught. Raises VmError if KVM refuses the set-up (no single-step debugging)."""

    def __init__(self, vm: Vm, apic_id: int, vcpu_count: int, area: ProxyArea, slot: int) -> None:
        """`slot` (0 to MAX_PROXIES - 1) picks the proxy's stack in `area`."""
        if not 0 <= slot < MAX_PROXIES:
            raise VmError(f"at most {MAX_PROXIES} proxy vCPUs per fragment, not {slot + 1}")
        self.apic_id = apic_id
        self._area = area
        self._stack_top = STACKS_OFFSET + (slot + 1) * STACK_SIZE
        self._rearm: Callable[[], None] | None = None
        self.x2apic = False  # the mode it is in (KVM creates LAPICs in xAPIC mode)
        self.want_x2apic = False  # the mode the local vCPUs use (see `follow_mode`)
        self._halted_regs = kvm_abi.KvmRegs(
            rip=PROXY_AREA + HALT_OFFSET,
            rsp=PROXY_AREA + self._stack_top,
            rflags=RFLAGS_IF | RFLAGS_FIXED,
        )
        self.vcpu = Vcpu(vm.fd, apic_id, vm.vcpu_mmap_size)
        try:
            self._setup(vm, vcpu_count)
        except BaseException:
            self.vcpu.close()
            raise

    def _setup(self, vm: Vm, vcpu_count: int) -> None:
        self.vcpu.set_cpuid(
            vcpu_cpuid(vm.supported_cpuid(), self.apic_id, vcpu_count, CpuidOptions())
        )
        self._enable_lapic()
        debug = kvm_abi.KvmGuestDebug(
            control=kvm_abi.KVM_GUESTDBG_ENABLE | kvm_abi.KVM_GUESTDBG_SINGLESTEP
        )
        try:
            kvm_abi.ioctl(self.vcpu.fd, kvm_abi.KVM_SET_GUEST_DEBUG, debug, "KVM_SET_GUEST_DEBUG")
        except OSError as err:
            raise VmError(
                f"interrupts across fragments need single-step debugging: {err}"
            ) from None
        self.arm()

    @property
    def fd(self) -> int:
        return self.vcpu.fd

    def _enable_lapic(self) -> None:
        """Software-enable the LAPIC (SVR bit 8, spurious vector 0xFF): at creation, after an
        INIT and after a mode change, all of which leave it disabled."""
        lapic = kvm_abi.KvmLapicState()
        kvm_abi.ioctl(self.vcpu.fd, kvm_abi.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        svr = int.from_bytes(bytes(lapic.regs[APIC_SVR : APIC_SVR + 4]), "little")
        svr |= APIC_SVR_ENABLE | 0xFF
        lapic.regs[APIC_SVR : APIC_SVR + 4] = list(svr.to_bytes(4, "little"))
        kvm_abi.ioctl(self.vcpu.fd, kvm_abi.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def follow_mode(self) -> None:
        """On the proxy's thread, outside KVM_RUN: switch its LAPIC to `want_x2apic`, the mode
        the local vCPUs last chose (the machine traps their IA32_APIC_BASE writes). KVM
        matches destinations by the target's mode: an x2APIC broadcast or logical IPI reaches
        only an x2APIC-mode LAPIC, an xAPIC broadcast only an xAPIC-mode one (SDM vol. 3A
        §10.12.9). Leaving x2APIC goes through disabled, as it must (§10.12.5)."""
        if self.want_x2apic == self.x2apic:
            return
        base = LAPIC_BASE | kvm_abi.APICBASE_ENABLE | (APICBASE_BSP if self.apic_id == 0 else 0)
        if self.want_x2apic:
            steps = [base | kvm_abi.APICBASE_X2APIC]
        else:
            steps = [base & ~kvm_abi.APICBASE_ENABLE, base]
        for value in steps:
            if not self.vcpu.set_msr(kvm_abi.MSR_IA32_APICBASE, value):
                raise VmError(
                    f"proxy of APIC id {self.apic_id}: KVM refused IA32_APIC_BASE {value:#x}"
                )
        self.x2apic = self.want_x2apic
        self._enable_lapic()

    def arm(self) -> None:
        """Halted at CPL0 in the proxy area, interrupts and NMIs open."""
        sregs = self.vcpu.sregs()
        sregs.cs = _flat(CODE_SELECTOR, 0xB)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _flat(DATA_SELECTOR, 0x3))
        sregs.tr = kvm_abi.KvmSegment(base=0, limit=0x67, type=0xB, present=1)
        sregs.gdt.base, sregs.gdt.limit = PROXY_AREA + GDT_OFFSET, 3 * 8 - 1
        sregs.idt.base, sregs.idt.limit = PROXY_AREA + IDT_OFFSET, 256 * 8 - 1
        sregs.cr0, sregs.cr4, sregs.efer = CR0_PE | CR0_ET, 0, 0
        self.vcpu.set_sregs(sregs)
        self._unmask_nmi()
        self._halt()

    def _halt(self) -> None:
        """Back to the halt with the stack reset (an interrupt gate at the same privilege
        changes only these: SDM vol. 3A §6.12.1), HALTED. In x2APIC mode the EOI is also
        written to its MSR: KVM may ignore the stub's MMIO write then (SDM vol. 3A §10.12.1.2;
        an EOI with nothing in service does nothing)."""
        if self.x2apic:
            self.vcpu.set_msr(X2APIC_EOI_MSR, 0)
        self.vcpu.set_regs(self._halted_regs)
        self.vcpu.set_mp_state(kvm_abi.KVM_MP_STATE_HALTED)

    def _unmask_nmi(self) -> None:
        events = kvm_abi.KvmVcpuEvents()
        kvm_abi.ioctl(self.vcpu.fd, kvm_abi.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        events.nmi_masked, events.flags = 0, 0  # no iret ran: unblock NMIs ourselves
        kvm_abi.ioctl(self.vcpu.fd, kvm_abi.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def catch(self) -> list[Interrupt] | None:
        """After KVM_RUN returned: the interrupts caught (in the order to deliver them), or
        None for an exit that caught nothing (a kick). Call `rearm()` before the next
        KVM_RUN (after sending them on: the send does not wait for the re-arming ioctls).
        VmError for an exit a proxy never makes (the message names the exit and where)."""
        reason = self.vcpu.run.exit_reason
        if reason == kvm_abi.KVM_EXIT_INTR:
            return None  # a kick that found the proxy outside KVM_RUN's wait
        regs = self.vcpu.regs()
        rip = regs.rip
        stub = (rip - PROXY_AREA - STUBS_OFFSET) // STUB_SIZE
        if reason == kvm_abi.KVM_EXIT_DEBUG and 0 <= stub < NMI_STUB:
            self._rearm = self._halt  # the fast path: a fixed IPI changed nothing else
            return [Interrupt(DeliveryMode.FIXED, stub)]
        if reason == kvm_abi.KVM_EXIT_DEBUG and stub == NMI_STUB:
            self._rearm = self._after_nmi
            # The NMI may have arrived as a fixed IPI entered its stub, before the stub's
            # first instruction: the NMI's frame (EIP on top) then points at that stub, whose
            # EOI the NMI stub's own EOI did. Report both, the fixed one first.
            interrupted = self._area.read_u32(regs.rsp - PROXY_AREA)
            fixed, offset = divmod(interrupted - PROXY_AREA - STUBS_OFFSET, STUB_SIZE)
            if 0 <= fixed < NMI_STUB and offset == 0:
                return [Interrupt(DeliveryMode.FIXED, fixed), Interrupt(DeliveryMode.NMI)]
            return [Interrupt(DeliveryMode.NMI)]
        sregs = self.vcpu.sregs()
        if sregs.cr0 & CR0_PE:
            raise VmError(
                f"proxy of APIC id {self.apic_id}: unexpected {kvm_abi.exit_name(reason)}"
                f" at rip={rip:#x}"
            )
        # Real mode: INIT ran, then a SIPI (or, for the BSP, the reset vector). The exit may
        # be the first instruction's I/O rather than the single-step: its completion on the
        # next entry only writes a register of the re-armed proxy.
        self._rearm = self._after_init
        if sregs.cs.base == PROXY_AREA:
            return [Interrupt(DeliveryMode.INIT)]
        vector = sregs.cs.selector >> 8
        return [Interrupt(DeliveryMode.INIT), Interrupt(DeliveryMode.STARTUP, vector)]

    def rearm(self) -> None:
        """Undo what the last catch left (see `catch`); nothing after a kick."""
        rearm, self._rearm = self._rearm, None
        if rearm is not None:
            rearm()

    def _after_nmi(self) -> None:
        self._unmask_nmi()
        self._halt()

    def _after_init(self) -> None:
        self._enable_lapic()  # INIT reset the LAPIC: software-disabled again
        self.arm()

    def close(self) -> None:
        self.vcpu.close()
