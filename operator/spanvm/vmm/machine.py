"""A KVM virtual machine run by this process: guest RAM, a boot source, devices on buses, vCPU
threads, exit dispatch and stop.

The pieces live apart, as in Firecracker's `vstate/` and kvmtool: `vm.py` (KVM VM, slots,
irqchip, PIT), `vcpu.py` (one vCPU's fd and state), `cpuid.py`, `memory.py`/`memmap.py`,
`boot/` (what runs and the first vCPU state), `bus.py` + `devices/` + `platform.py` (port and
MMIO devices). This module wires them and runs: each vCPU is a thread looping on KVM_RUN
(through ctypes, which releases the GIL, so vCPUs run in parallel); port and MMIO exits go to
the bus; any exit the monitor does not expect stops the whole VM with an error naming the exit
reason, the vCPU and its registers. A stop interrupts running vCPUs with SIGUSR1 plus
`immediate_exit`, so no vCPU is left in the guest.
"""

import ctypes
import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType, TracebackType

from spanvm.payloads.build import PayloadImage
from spanvm.vmm import kvm_abi, platform
from spanvm.vmm.boot import BootError, BootSource, GuestShape
from spanvm.vmm.boot.payload import PayloadBoot
from spanvm.vmm.bus import Bus, VcpuStopError
from spanvm.vmm.console import Console
from spanvm.vmm.cpuid import CpuidOptions, vcpu_cpuid
from spanvm.vmm.errors import EXIT_VM_ERROR, VmError
from spanvm.vmm.interrupts import Interrupt, msi
from spanvm.vmm.layout import GuestLayout
from spanvm.vmm.memmap import ram_ranges
from spanvm.vmm.memory import GuestMemory
from spanvm.vmm.platform_shape import NumaNode
from spanvm.vmm.proxy import ProxyArea, ProxyVcpu
from spanvm.vmm.vcpu import Vcpu
from spanvm.vmm.vm import Vm

__all__ = ["EXIT_VM_ERROR", "Machine", "VmConfig", "VmError", "VmResult"]

KVM_DEVICE = "/dev/kvm"
KICK_SIGNAL = signal.SIGUSR1
PROXY_SWITCH_TIMEOUT = 5.0  # seconds the proxies get to follow an APIC mode change
log = logging.getLogger(__name__)


@dataclass
class VmConfig:
    """What to run: memory (bytes), vCPUs, and the boot source; a payload `image` with its
    `arg` is the short form of `boot=PayloadBoot(image, arg)`."""

    memory_size: int
    vcpu_count: int
    image: PayloadImage | None = None
    arg: int = 0
    local_vcpus: tuple[int, ...] | None = None  # vCPUs this process runs (all by default)
    # A fragment runs vCPU threads at a lower priority (this nice value, SCHED_OTHER) so that
    # page-fault service, which guests wait on, preempts vCPUs spinning on other pages (2
    # cores, many threads). Not SCHED_IDLE: that starves the guest beside any busy process.
    vcpu_nice: int | None = None
    device: str = KVM_DEVICE
    boot: BootSource | None = None
    cpuid: CpuidOptions = field(default_factory=CpuidOptions)
    nodes: tuple[NumaNode, ...] = ()  # the guest's NUMA nodes (fragments); one node if empty

    def boot_source(self) -> BootSource:
        if self.boot is not None:
            return self.boot
        if self.image is None:
            raise VmError("nothing to boot: give a payload image or a boot source")
        return PayloadBoot(self.image, self.arg)


@dataclass
class VmResult:
    """How a run ended."""

    exit_code: int | None
    error: str | None
    timed_out: bool
    console: str
    wall_seconds: float
    exits: int
    marks: list[tuple[int, int, float]] = field(default_factory=list)  # (vcpu, value, time)

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code == 0


def _apic_mode_change_allowed(old: int, new: int) -> bool:
    """Whether a guest may move its IA32_APIC_BASE from `old` to `new` (SDM vol. 3A
    §10.12.5, Figure 10-27): not from x2APIC straight to xAPIC, not from disabled straight
    to x2APIC (KVM_SET_MSRS, being host-initiated, would allow both; KVM itself refuses
    EXTD without EN)."""
    xapic = kvm_abi.APICBASE_ENABLE
    x2apic = kvm_abi.APICBASE_ENABLE | kvm_abi.APICBASE_X2APIC
    was, will = old & x2apic, new & x2apic  # 0: disabled
    return not ((was == x2apic and will == xapic) or (was == 0 and will == x2apic))


def _common_tsc(vcpu: Vcpu) -> None:
    """Guest TSC = host TSC (offset 0), as in every other fragment of the VM; VmError naming
    what is missing on a KVM without KVM_VCPU_TSC_CTRL (Linux 5.16)."""
    try:
        vcpu.set_tsc_offset(0)
    except OSError as err:
        raise VmError(
            f"vCPU {vcpu.id}: cannot set the TSC offset ({err}): this KVM lacks"
            " KVM_VCPU_TSC_CTRL (Linux 5.16+), and fragments would disagree on time"
        ) from None


def _noop_handler(_signum: int, _frame: FrameType | None) -> None:
    """SIGUSR1 only needs to interrupt KVM_RUN; nothing to do in Python."""


class Machine:
    """One VM in this process. Use as a context manager; `run()` once."""

    def __init__(
        self,
        config: VmConfig,
        console_sink: Callable[[bytes], None] | None = None,
        exit_handler: Callable[[int], None] | None = None,
        interrupt_sink: Callable[[int, Interrupt, int], None] | None = None,
    ) -> None:
        """`exit_handler`, if given, receives the guest's exit code instead of the VM stopping
        at once (a fragment forwards it to fragment 0, which stops every fragment).
        `interrupt_sink(apic_id, interrupt, caught_ns)` receives, in the order caught (at
        time.monotonic_ns() `caught_ns`, when KVM_RUN returned), every interrupt a
        local vCPU sends to a vCPU this process does not run (a platform boot in a fragment:
        one proxy vCPU per remote APIC id catches them, see proxy.py); the fragment running
        that vCPU passes it to its `deliver`.
        Raises VmError (BootError for bad boot inputs) before any vCPU runs; nothing is left
        behind."""
        self.config = config
        self._exit_handler = exit_handler
        self._interrupt_sink = interrupt_sink
        self.proxies: dict[int, ProxyVcpu] = {}
        self._proxy_area: ProxyArea | None = None
        self.console = Console(console_sink)
        self.vcpus: dict[int, Vcpu] = {}
        self.memory: GuestMemory | None = None
        self.vm: Vm | None = None
        self.io_bus, self.mmio_bus = Bus("port"), Bus("MMIO")
        self._stop = threading.Event()
        self._resumed = threading.Event()  # cleared by pause(): vCPUs hold outside the guest
        self._resumed.set()
        self._lock = threading.Lock()
        self._exit_code: int | None = None
        self._error: str | None = None
        self._unhandled_ports: set[int] = set()
        self.marks: list[tuple[int, int, float]] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction --------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        self.boot = cfg.boot_source()
        nodes = cfg.nodes or (
            NumaNode(
                0,
                tuple(range(cfg.vcpu_count)),
                tuple((r.gpa, r.end) for r in ram_ranges(cfg.memory_size)),
            ),
        )
        self.shape = GuestShape(cfg.memory_size, cfg.vcpu_count, nodes)
        if cfg.vcpu_count < 1:
            raise VmError(f"vcpus must be between 1 and the VM's limit, got {cfg.vcpu_count}")
        self.boot.check(self.shape)  # every input read and checked before KVM is touched
        local = cfg.local_vcpus if cfg.local_vcpus is not None else tuple(range(cfg.vcpu_count))
        if not local or any(not 0 <= v < cfg.vcpu_count for v in local):
            raise VmError(
                f"local vCPUs {local} must be a non-empty subset of 0..{cfg.vcpu_count - 1}"
            )
        self.vm = Vm(cfg.device)
        limit = self.vm.max_vcpus()
        if cfg.vcpu_count > limit:
            raise BootError(f"{cfg.vcpu_count} vCPUs: this KVM allows at most {limit} per VM")
        tables = platform.platform_shape(self.shape)
        platform.route_interrupts(self.vm, tables)
        self.memory = GuestMemory(cfg.memory_size)
        self.vm.map_memory(self.memory)
        if self.boot.platform:
            platform.write_firmware_tables(self.memory, tables)
        self.boot.load(self.memory, self.shape)
        self.com1 = platform.attach_devices(self, self.io_bus, self.mmio_bus, self.shape)
        supported = self.vm.supported_cpuid()
        for vcpu_id in sorted(local):
            vcpu = Vcpu(self.vm.fd, vcpu_id, self.vm.vcpu_mmap_size)
            self.vcpus[vcpu_id] = vcpu
            vcpu.set_cpuid(vcpu_cpuid(supported, vcpu_id, cfg.vcpu_count, cfg.cpuid))
            if cfg.local_vcpus is not None:  # a fragment: one TSC for all fragments
                _common_tsc(vcpu)
            self.boot.setup_vcpu(vcpu, self.shape)
        remote = sorted(set(range(cfg.vcpu_count)) - set(local))
        if remote and self.boot.platform:
            self._proxy_area = ProxyArea(self.vm)
            for slot, apic_id in enumerate(remote):
                self.proxies[apic_id] = ProxyVcpu(
                    self.vm, apic_id, cfg.vcpu_count, self._proxy_area, slot
                )
            # Proxies follow the local vCPUs' xAPIC/x2APIC mode: see ProxyVcpu.follow_mode.
            self.vm.trap_msr_writes([kvm_abi.MSR_IA32_APICBASE])

    @property
    def layout(self) -> GuestLayout | None:
        """The payload layout, for payload boots."""
        return self.boot.layout if isinstance(self.boot, PayloadBoot) else None

    # -- what devices may ask (devices.DeviceHost) -------------------------------------------
    @property
    def guest_memory(self) -> GuestMemory:
        assert self.memory is not None
        return self.memory

    def set_irq_line(self, irq: int, level: bool) -> None:
        assert self.vm is not None
        self.vm.set_irq_line(irq, level)

    def symbolize(self, address: int) -> str:
        return self.boot.symbolize(address)

    def guest_exit(self, vcpu: Vcpu, code: int) -> None:
        """The guest reported its exit code through vCPU `vcpu`."""
        if self._exit_handler is not None:
            vcpu.parked = True
            self._exit_handler(code)
        else:
            self.finish(code)

    def park(self, vcpu: Vcpu) -> None:
        """vCPU `vcpu` has nothing more to do; if every vCPU of a whole VM parks, that is an
        error (no exit code)."""
        vcpu.parked = True
        if all(v.parked for v in self.vcpus.values()) and self.config.local_vcpus is None:
            self.fail("every vCPU parked and none reported an exit code")

    def deliver(self, apic_id: int, interrupt: Interrupt) -> bool:
        """Deliver an interrupt caught in another fragment to local vCPU `apic_id` (through
        the in-kernel LAPIC, as an MSI); False if this process does not run that vCPU."""
        vm = self.vm  # close() may clear it from another thread
        if apic_id not in self.vcpus or vm is None:
            return False
        vm.signal_msi(*msi(apic_id, interrupt))
        return True

    def feed_console(self, data: bytes) -> None:
        """Bytes typed at the guest's serial console (COM1)."""
        self.com1.feed(data)

    # -- running ---------------------------------------------------------------------------------
    def run(self, idle_timeout: float | None = None) -> VmResult:
        """Run every local vCPU until the guest exits, an error, or `idle_timeout` seconds idle:
        no console output (from any vCPU, remote ones included) and no exit to this monitor
        (doorbell writes, port I/O: any KVM_RUN return) from its local vCPUs. Returns how it
        ended."""
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(KICK_SIGNAL, _noop_handler) if in_main else None
        if not in_main and signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise VmError("Machine.run outside the main thread needs a SIGUSR1 handler installed")
        started = time.monotonic()
        self.console.last_output = started
        timed_out = False
        try:
            for vcpu in self.vcpus.values():
                vcpu.thread = threading.Thread(
                    target=self._vcpu_loop, args=(vcpu,), name=f"vcpu-{vcpu.id}", daemon=True
                )
                vcpu.thread.start()
            for proxy in self.proxies.values():
                proxy.vcpu.thread = threading.Thread(
                    target=self._proxy_loop, args=(proxy,), name=f"proxy-{proxy.apic_id}",
                    daemon=True,
                )  # fmt: skip
                proxy.vcpu.thread.start()
            exits_seen, active_at = -1, started
            while not self._stop.wait(0.05):
                if idle_timeout is None:
                    continue
                now, exits = time.monotonic(), sum(v.exits for v in self.vcpus.values())
                if exits != exits_seen:  # an exit is activity, as console output is
                    exits_seen, active_at = exits, now
                if now - max(active_at, self.console.last_output) > idle_timeout:
                    timed_out = True
                    self._request_stop()
                    break
            self._request_stop()
            self._join()
            if timed_out:
                self.fail(
                    f"guest neither exited nor printed for {idle_timeout:g}s; stopped it. "
                    + self.where_vcpus_were()
                )
        except KeyboardInterrupt:
            self._request_stop()
            self._join()
            self.fail("interrupted; " + self.where_vcpus_were())
        finally:
            if in_main:
                signal.signal(KICK_SIGNAL, previous)
        return VmResult(
            exit_code=self._exit_code if self._error is None else None,
            error=self._error,
            timed_out=timed_out,
            console=self.console.text,
            wall_seconds=time.monotonic() - started,
            exits=sum(v.exits for v in self.vcpus.values()),
            marks=list(self.marks),
        )

    def _all_vcpus(self) -> list[Vcpu]:
        return [*self.vcpus.values(), *(p.vcpu for p in self.proxies.values())]

    def _join(self) -> None:
        for vcpu in self._all_vcpus():
            while vcpu.thread is not None and vcpu.thread.is_alive():
                self._kick(vcpu)
                vcpu.thread.join(0.05)

    def _request_stop(self) -> None:
        self._stop.set()
        for vcpu in self._all_vcpus():
            self._kick(vcpu)

    @staticmethod
    def _kick(vcpu: Vcpu) -> None:
        with vcpu.kick_lock:
            if vcpu.closed:  # torn down already: nothing to stop (and kvm_run is unmapped)
                return
            vcpu.run.immediate_exit = 1
            thread = vcpu.thread
            if vcpu.looping and thread is not None and thread.ident is not None:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def pause(self) -> None:
        """Hold every local vCPU outside the guest until resume(): guest time stops, while
        memory, devices and (in a fragment) the fabric keep serving. Signal-handler safe:
        clears a flag and kicks the vCPU threads."""
        self._resumed.clear()
        for vcpu in self.vcpus.values():
            self._kick(vcpu)

    def resume(self) -> None:
        """Let paused vCPUs enter the guest again, where they left it."""
        self._resumed.set()

    @property
    def paused(self) -> bool:
        """Whether pause() holds the vCPUs."""
        return not self._resumed.is_set()

    def _hold(self, vcpu: Vcpu) -> None:
        """On vCPU `vcpu`'s thread: wait out a pause (or a stop), then clear the kick that
        brought it here so KVM_RUN enters the guest again."""
        while not self._stop.is_set() and not self._resumed.wait(0.05):
            pass
        if not self._stop.is_set():
            vcpu.run.immediate_exit = 0

    @property
    def stop_requested(self) -> threading.Event:
        """Set once the VM was told to stop (exit, error, timeout)."""
        return self._stop

    def fail(self, message: str) -> None:
        """Stop the VM with an error (the first error or exit wins)."""
        with self._lock:
            if self._error is None and self._exit_code is None:
                self._error = message
        self._request_stop()

    def finish(self, code: int) -> None:
        """Stop the VM with the guest's exit code (the first error or exit wins)."""
        with self._lock:
            if self._error is None and self._exit_code is None:
                self._exit_code = code
        self._request_stop()

    def _vcpu_loop(self, vcpu: Vcpu) -> None:
        with vcpu.kick_lock:
            vcpu.looping = True
        try:
            self._run_vcpu(vcpu)
        finally:
            with vcpu.kick_lock:
                vcpu.looping = False

    def _proxy_loop(self, proxy: ProxyVcpu) -> None:
        """A proxy vCPU's thread: run it, pass each caught interrupt to the sink."""
        with proxy.vcpu.kick_lock:
            proxy.vcpu.looping = True
        try:
            while not self._stop.is_set():
                proxy.follow_mode()
                if kvm_abi.libc.ioctl(proxy.fd, kvm_abi.KVM_RUN, None) < 0:
                    err = ctypes.get_errno()
                    if err in (errno.EINTR, errno.EAGAIN):
                        if not self._stop.is_set():
                            proxy.vcpu.run.immediate_exit = 0  # a mode kick, not a stop
                        continue
                    self.fail(f"proxy of vCPU {proxy.apic_id}: KVM_RUN failed: {os.strerror(err)}")
                    return
                caught_ns = time.monotonic_ns()
                for interrupt in proxy.catch() or ():
                    if self._interrupt_sink is not None:
                        self._interrupt_sink(proxy.apic_id, interrupt, caught_ns)
                proxy.rearm()
        except Exception as err:  # a monitor bug must stop the VM, not hang it
            self.fail(f"proxy of vCPU {proxy.apic_id}: monitor error: {err!r}")
        finally:
            with proxy.vcpu.kick_lock:
                proxy.vcpu.looping = False

    def _run_vcpu(self, vcpu: Vcpu) -> None:
        if self.config.vcpu_nice is not None:  # per thread: setpriority on the thread id
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.vcpu_nice)
        try:
            while not self._stop.is_set():
                if not self._resumed.is_set():
                    self._hold(vcpu)
                    continue
                if kvm_abi.libc.ioctl(vcpu.fd, kvm_abi.KVM_RUN, None) < 0:
                    err = ctypes.get_errno()
                    if err in (errno.EINTR, errno.EAGAIN):
                        continue
                    self.fail(f"vCPU {vcpu.id}: KVM_RUN failed: {os.strerror(err)}")
                    return
                vcpu.exits += 1
                if not self._handle_exit(vcpu):
                    return
        except Exception as err:  # a monitor bug must stop the VM, not hang it
            self.fail(f"vCPU {vcpu.id}: monitor error: {err!r}")

    def _handle_exit(self, vcpu: Vcpu) -> bool:
        """Act on one exit; False when this vCPU's thread should end."""
        reason = vcpu.run.exit_reason
        try:
            if reason == kvm_abi.KVM_EXIT_IO:
                io = vcpu.exit_union(kvm_abi.KvmRunIo)
                assert isinstance(io, kvm_abi.KvmRunIo)
                self._port_io(vcpu, io)
                return True
            if reason == kvm_abi.KVM_EXIT_MMIO:
                mmio = vcpu.exit_union(kvm_abi.KvmRunMmio)
                assert isinstance(mmio, kvm_abi.KvmRunMmio)
                return self._mmio(vcpu, mmio)
        except VcpuStopError:
            return False
        if reason == kvm_abi.KVM_EXIT_INTR:
            return True
        if reason == kvm_abi.KVM_EXIT_X86_WRMSR:
            msr = vcpu.exit_union(kvm_abi.KvmRunMsr)
            assert isinstance(msr, kvm_abi.KvmRunMsr)
            self._apic_base_write(vcpu, msr)
            return True
        if reason == kvm_abi.KVM_EXIT_SHUTDOWN:
            detail = (
                "KVM_EXIT_SHUTDOWN (triple fault: the guest took an exception"
                " it has no handler for)"
            )
        elif reason == kvm_abi.KVM_EXIT_FAIL_ENTRY:
            fail = vcpu.exit_union(kvm_abi.KvmRunFailEntry)
            assert isinstance(fail, kvm_abi.KvmRunFailEntry)
            detail = (
                f"KVM_EXIT_FAIL_ENTRY (hardware reason {fail.hardware_entry_failure_reason:#x})"
            )
        elif reason == kvm_abi.KVM_EXIT_INTERNAL_ERROR:
            detail = platform.internal_error(vcpu, self.memory)
        elif reason == kvm_abi.KVM_EXIT_SYSTEM_EVENT:
            event = vcpu.exit_union(kvm_abi.KvmRunSystemEvent)
            assert isinstance(event, kvm_abi.KvmRunSystemEvent)
            kinds = {1: "shutdown", 2: "reset", 3: "crash"}
            detail = f"the guest asked for a system {kinds.get(event.type, event.type)}"
        else:
            detail = f"unexpected exit {kvm_abi.exit_name(reason)}"
        self.fail(self.describe(vcpu, detail))
        return False

    def _apic_base_write(self, vcpu: Vcpu, msr: kvm_abi.KvmRunMsr) -> None:
        """A local vCPU's WRMSR to IA32_APIC_BASE (the only MSR trapped): carry it out on the
        vCPU (error 1 makes KVM inject the #GP it would have), then move the proxies to the
        xAPIC/x2APIC mode it chose."""
        done = (
            msr.index == kvm_abi.MSR_IA32_APICBASE
            and _apic_mode_change_allowed(vcpu.sregs().apic_base, msr.data)
            and vcpu.set_msr(msr.index, msr.data)
        )
        msr.error = 0 if done else 1
        if done and msr.data & kvm_abi.APICBASE_ENABLE:
            x2apic = bool(msr.data & kvm_abi.APICBASE_X2APIC)
            moving = [p for p in self.proxies.values() if p.want_x2apic != x2apic]
            for proxy in moving:
                proxy.want_x2apic = x2apic
                self._kick(proxy.vcpu)
            # The guest's next IPI may rely on the new mode (an x2APIC broadcast): the WRMSR
            # completes only once every proxy has switched.
            deadline = time.monotonic() + PROXY_SWITCH_TIMEOUT
            while any(p.x2apic != x2apic for p in moving) and not self._stop.is_set():
                if time.monotonic() > deadline:
                    late = [p.apic_id for p in moving if p.x2apic != x2apic]
                    self.fail(f"proxies of APIC ids {late} did not switch APIC mode in time")
                    return
                time.sleep(0.0002)

    def _port_io(self, vcpu: Vcpu, io: kvm_abi.KvmRunIo) -> None:
        """Port I/O (`count` repetitions for string I/O) to the device on the port bus.
        Ports with no device read as all ones and ignore writes, as on a PC's ISA bus; the
        first access to each is logged."""
        mapping = self.io_bus.find(io.port)
        data = vcpu.run_address + io.data_offset
        for i in range(io.count):
            at = data + i * io.size
            if mapping is None:
                if io.port not in self._unhandled_ports:
                    self._unhandled_ports.add(io.port)
                    log.info("vCPU %d: port %#x has no device (ignored)", vcpu.id, io.port)
                if not io.direction:
                    ctypes.memset(at, 0xFF, io.size)
                continue
            offset = io.port - mapping.base
            if io.direction:  # out
                value = int.from_bytes(ctypes.string_at(at, io.size), "little")
                mapping.device.write(vcpu, offset, io.size, value)
            else:
                value = mapping.device.read(vcpu, offset, io.size)
                ctypes.memmove(at, value.to_bytes(io.size, "little"), io.size)

    def _mmio(self, vcpu: Vcpu, mmio: kvm_abi.KvmRunMmio) -> bool:
        mapping = self.mmio_bus.find(mmio.phys_addr)
        if mapping is None:
            kind = "write to" if mmio.is_write else "read from"
            self.fail(
                self.describe(
                    vcpu,
                    f"guest {kind} unmapped guest-physical address {mmio.phys_addr:#x}"
                    f" ({mmio.len} bytes)",
                )
            )
            return False
        offset = mmio.phys_addr - mapping.base
        if mmio.is_write:
            value = int.from_bytes(bytes(mmio.data)[: mmio.len], "little")
            mapping.device.write(vcpu, offset, mmio.len, value)
        else:
            value = mapping.device.read(vcpu, offset, mmio.len)
            for i, byte in enumerate(value.to_bytes(mmio.len, "little")):
                mmio.data[i] = byte
        return True

    def describe(self, vcpu: Vcpu, what: str) -> str:
        """`vCPU n: what; registers` for error messages."""
        return f"vCPU {vcpu.id}: {what}; {self._registers(vcpu)}"

    def _registers(self, vcpu: Vcpu) -> str:
        regs = vcpu.regs()
        where = self.boot.symbolize(regs.rip)
        names = ("rip", "rsp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rflags")
        text = " ".join(f"{n}={getattr(regs, n):#x}" for n in names)
        return f"{text}{f' ({where})' if where else ''}"

    def where_vcpus_were(self) -> str:
        """Each vCPU's rip and function, or that it parked."""
        parts = []
        for vcpu in self.vcpus.values():
            if vcpu.parked:
                parts.append(f"vCPU {vcpu.id}: parked")
            else:
                parts.append(f"vCPU {vcpu.id}: {self._registers(vcpu)}")
        return "; ".join(parts)

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release vCPUs, the VM, /dev/kvm and guest RAM (idempotent)."""
        self._request_stop()
        self._join()
        for vcpu in self.vcpus.values():
            vcpu.close()
        self.vcpus.clear()
        for proxy in self.proxies.values():
            proxy.close()
        self.proxies.clear()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self._proxy_area is not None:
            self._proxy_area.close()
            self._proxy_area = None

    def __enter__(self) -> "Machine":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
