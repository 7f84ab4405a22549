"""A KVM virtual machine run by this process: RAM, vCPU threads, exit handling, stop.

Each vCPU is a thread looping on KVM_RUN (through ctypes, which releases the GIL, so vCPUs
run in parallel). Guests signal the monitor through the MMIO doorbell (see layout.py). Any
exit the monitor does not expect stops the whole VM with an error naming the exit reason,
the vCPU and its registers. A stop interrupts running vCPUs with SIGUSR1 plus
`immediate_exit`, so no vCPU is left in the guest.
"""

import ctypes
import errno
import os
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType, TracebackType

from spanvm.payloads.build import PayloadImage
from spanvm.vmm import kvm_abi, layout
from spanvm.vmm.console import Console
from spanvm.vmm.layout import Doorbell, GuestLayout
from spanvm.vmm.memory import GuestMemory, ram_ranges

KVM_DEVICE = "/dev/kvm"
KICK_SIGNAL = signal.SIGUSR1
TSS_ADDR = 0xFFFB_D000
MAX_MARKS = 4096
COM1 = 0x3F8


EXIT_VM_ERROR = 70  # process exit status of a VM (or fragment) stopped on an error


class VmError(RuntimeError):
    """The VM could not be built or stopped on an error; the message says why and where."""


@dataclass
class VmConfig:
    """What to run: memory, vCPUs, the payload image and its argument."""

    memory_size: int
    vcpu_count: int
    image: PayloadImage
    arg: int = 0
    local_vcpus: tuple[int, ...] | None = None  # vCPUs this process runs (all by default)
    # A fragment runs vCPU threads at a lower priority (this nice value, SCHED_OTHER) so that
    # page-fault service, which guests wait on, preempts vCPUs spinning on other pages (2
    # cores, many threads). Not SCHED_IDLE: that starves the guest beside any busy process.
    vcpu_nice: int | None = None
    device: str = KVM_DEVICE


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


def _noop_handler(_signum: int, _frame: FrameType | None) -> None:
    """SIGUSR1 only needs to interrupt KVM_RUN; nothing to do in Python."""


class Vcpu:
    """One vCPU: its fd, its shared kvm_run page and its exit counters."""

    def __init__(self, vm_fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.id = vcpu_id
        self.fd = kvm_abi.ioctl(
            vm_fd, kvm_abi.KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU {vcpu_id}"
        )
        self.mmap_size = mmap_size
        self.run_address = kvm_abi.mmap_fd(self.fd, mmap_size)
        self.run = kvm_abi.KvmRunHeader.from_address(self.run_address)
        self.exits = 0
        self.parked = False
        self.thread: threading.Thread | None = None
        # Kicks are sent only while the thread is in its loop: a signal to a thread that has
        # exited may reach another thread that reuses its pthread_t, after the handler is gone.
        self.kick_lock = threading.RLock()  # a signal handler on this thread may kick too
        self.looping = False

    def exit_union(self, kind: type[ctypes.Structure]) -> ctypes.Structure:
        return kind.from_address(self.run_address + kvm_abi.KVM_EXIT_UNION_OFFSET)

    def regs(self) -> kvm_abi.KvmRegs:
        regs = kvm_abi.KvmRegs()
        kvm_abi.ioctl(self.fd, kvm_abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def close(self) -> None:
        kvm_abi.munmap(self.run_address, self.mmap_size)
        os.close(self.fd)


class Machine:
    """One VM in this process. Use as a context manager; `run()` once."""

    def __init__(
        self,
        config: VmConfig,
        console_sink: Callable[[bytes], None] | None = None,
        exit_handler: Callable[[int], None] | None = None,
    ) -> None:
        """`exit_handler`, if given, receives the guest's exit code instead of the VM stopping
        at once (a fragment forwards it to fragment 0, which stops every fragment)."""
        self.config = config
        self._exit_handler = exit_handler
        self.console = Console(console_sink)
        self.vcpus: dict[int, Vcpu] = {}
        self.memory: GuestMemory | None = None
        self._kvm_fd = self._vm_fd = -1
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._exit_code: int | None = None
        self._error: str | None = None
        self.marks: list[tuple[int, int, float]] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction --------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        image_size = cfg.image.path.stat().st_size  # sizes first: never read what cannot fit
        try:
            plan = GuestLayout.plan(
                cfg.memory_size,
                cfg.vcpu_count,
                max(cfg.image.end, layout.IMAGE_BASE + image_size),
                ram_ranges(cfg.memory_size),
                image_name=f"payload image {cfg.image.path}",
            )
        except layout.LayoutError as err:
            raise VmError(str(err)) from None
        with cfg.image.path.open("rb") as image_file:
            image_bytes = image_file.read(image_size)
        local = cfg.local_vcpus if cfg.local_vcpus is not None else tuple(range(cfg.vcpu_count))
        if not local or any(not 0 <= v < cfg.vcpu_count for v in local):
            raise VmError(
                f"local vCPUs {local} must be a non-empty subset of 0..{cfg.vcpu_count - 1}"
            )
        self.memory = GuestMemory(cfg.memory_size)
        self.layout = plan
        try:
            self._kvm_fd = os.open(cfg.device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise VmError(f"cannot open {cfg.device}: {err.strerror}") from None
        version = kvm_abi.ioctl(self._kvm_fd, kvm_abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != kvm_abi.KVM_API_VERSION:
            raise VmError(
                f"{cfg.device} speaks KVM API {version}, expected {kvm_abi.KVM_API_VERSION}"
            )
        self._vm_fd = kvm_abi.ioctl(self._kvm_fd, kvm_abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        kvm_abi.ioctl(self._vm_fd, kvm_abi.KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR")
        kvm_abi.ioctl(self._vm_fd, kvm_abi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        for slot, ram in enumerate(self.memory.ranges):
            region = kvm_abi.KvmUserspaceMemoryRegion(
                slot=slot,
                flags=0,
                guest_phys_addr=ram.gpa,
                memory_size=ram.size,
                userspace_addr=self.memory.host_address + ram.host_offset,
            )
            kvm_abi.ioctl(
                self._vm_fd,
                kvm_abi.KVM_SET_USER_MEMORY_REGION,
                region,
                "KVM_SET_USER_MEMORY_REGION",
            )
        self.memory.write(cfg.image.load_address, image_bytes)
        self.loaded_end = cfg.image.load_address + len(image_bytes)
        layout.write_system_area(self.memory, plan, cfg.arg)
        mmap_size = kvm_abi.ioctl(
            self._kvm_fd, kvm_abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"
        )
        cpuid = kvm_abi.KvmCpuid2(nent=kvm_abi.MAX_CPUID_ENTRIES)
        kvm_abi.ioctl(
            self._kvm_fd, kvm_abi.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID"
        )
        for vcpu_id in sorted(local):
            vcpu = Vcpu(self._vm_fd, vcpu_id, mmap_size)
            self.vcpus[vcpu_id] = vcpu
            self._set_cpuid(vcpu, cpuid)
            sregs = kvm_abi.KvmSregs()
            kvm_abi.ioctl(vcpu.fd, kvm_abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
            layout.user_mode_sregs(sregs, plan.bootinfo_address(vcpu_id), vcpu_id, cfg.vcpu_count)
            kvm_abi.ioctl(vcpu.fd, kvm_abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")
            regs = layout.user_mode_regs(plan, vcpu_id, cfg.image.entry)
            kvm_abi.ioctl(vcpu.fd, kvm_abi.KVM_SET_REGS, regs, "KVM_SET_REGS")
            # With the in-kernel irqchip, application processors wait for INIT/SIPI; start them.
            state = kvm_abi.KvmMpState(kvm_abi.KVM_MP_STATE_RUNNABLE)
            kvm_abi.ioctl(vcpu.fd, kvm_abi.KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE")

    @staticmethod
    def _set_cpuid(vcpu: Vcpu, supported: kvm_abi.KvmCpuid2) -> None:
        cpuid = kvm_abi.KvmCpuid2()
        ctypes.memmove(ctypes.addressof(cpuid), ctypes.addressof(supported), ctypes.sizeof(cpuid))
        for i in range(cpuid.nent):
            entry = cpuid.entries[i]
            if entry.function == 1:
                entry.ebx = (entry.ebx & 0x00FFFFFF) | (vcpu.id << 24)
            elif entry.function in (0xB, 0x1F):
                entry.edx = vcpu.id
        kvm_abi.ioctl(vcpu.fd, kvm_abi.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

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

    def _join(self) -> None:
        for vcpu in self.vcpus.values():
            while vcpu.thread is not None and vcpu.thread.is_alive():
                self._kick(vcpu)
                vcpu.thread.join(0.05)

    def _request_stop(self) -> None:
        self._stop.set()
        for vcpu in self.vcpus.values():
            self._kick(vcpu)

    @staticmethod
    def _kick(vcpu: Vcpu) -> None:
        vcpu.run.immediate_exit = 1
        with vcpu.kick_lock:
            thread = vcpu.thread
            if vcpu.looping and thread is not None and thread.ident is not None:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)

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

    def _run_vcpu(self, vcpu: Vcpu) -> None:
        if self.config.vcpu_nice is not None:  # per thread: setpriority on the thread id
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.vcpu_nice)
        try:
            while not self._stop.is_set():
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
        if reason == kvm_abi.KVM_EXIT_MMIO:
            mmio = vcpu.exit_union(kvm_abi.KvmRunMmio)
            assert isinstance(mmio, kvm_abi.KvmRunMmio)
            return self._doorbell(vcpu, mmio)
        if reason == kvm_abi.KVM_EXIT_IO:
            io = vcpu.exit_union(kvm_abi.KvmRunIo)
            assert isinstance(io, kvm_abi.KvmRunIo)
            if io.direction == 1 and io.port == COM1 and io.size == 1:
                data = ctypes.string_at(vcpu.run_address + io.data_offset, io.count)
                self.console.write(data)
                return True
            self.fail(
                self._describe(
                    vcpu,
                    f"unexpected port I/O {'out' if io.direction else 'in'}"
                    f" port {io.port:#x} size {io.size}",
                )
            )
            return False
        if reason == kvm_abi.KVM_EXIT_INTR:
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
            internal = vcpu.exit_union(kvm_abi.KvmRunInternal)
            assert isinstance(internal, kvm_abi.KvmRunInternal)
            detail = f"KVM_EXIT_INTERNAL_ERROR (suberror {internal.suberror})"
        else:
            detail = f"unexpected exit {kvm_abi.exit_name(reason)}"
        self.fail(self._describe(vcpu, detail))
        return False

    def _doorbell(self, vcpu: Vcpu, mmio: kvm_abi.KvmRunMmio) -> bool:
        offset = mmio.phys_addr - layout.MMIO_BASE
        if not mmio.is_write or not 0 <= offset < layout.MMIO_SIZE:
            kind = "write to" if mmio.is_write else "read from"
            self.fail(
                self._describe(
                    vcpu,
                    f"guest {kind} unmapped guest-physical address {mmio.phys_addr:#x}"
                    f" ({mmio.len} bytes)",
                )
            )
            return False
        value = int.from_bytes(bytes(mmio.data)[: mmio.len], "little")
        if offset == Doorbell.WRITE:
            length, address = value >> 48, value & ((1 << 48) - 1)
            try:
                assert self.memory is not None
                self.console.write(self.memory.read(address, length))
            except ValueError:
                self.fail(
                    self._describe(
                        vcpu,
                        f"console write of {length} bytes at {address:#x} is outside guest RAM",
                    )
                )
                return False
        elif offset == Doorbell.PUTC:
            self.console.write(bytes([value & 0xFF]))
        elif offset == Doorbell.FAULT:
            self.fail(f"vCPU {vcpu.id}: {self._describe_exception(vcpu, value)}")
            return False
        elif offset == Doorbell.NOP:
            if len(self.marks) < MAX_MARKS:
                self.marks.append((vcpu.id, value, time.monotonic()))
        elif offset == Doorbell.EXIT:
            if self._exit_handler is not None:
                vcpu.parked = True
                self._exit_handler(value & 0xFFFFFFFF)
            else:
                self.finish(value & 0xFFFFFFFF)
            return False
        elif offset == Doorbell.PARK:
            vcpu.parked = True
            if all(v.parked for v in self.vcpus.values()) and self.config.local_vcpus is None:
                self.fail("every vCPU parked and none reported an exit code")
            return False
        else:
            self.fail(self._describe(vcpu, f"write to unknown doorbell register {offset:#x}"))
            return False
        return True

    def _describe_exception(self, vcpu: Vcpu, frame_address: int) -> str:
        """The guest's exception, from the frame its ring-0 stub reported: vector, error code,
        where it happened (symbolised), and CR2 for a page fault."""
        assert self.memory is not None
        try:
            frame = struct.unpack("<7Q", self.memory.read(frame_address, 56))
        except ValueError:
            return f"guest exception with an unreadable frame at {frame_address:#x}"
        vector, error, rip, _cs, rflags, rsp, _ss = frame
        name = layout.EXCEPTIONS.get(vector, f"vector {vector}")
        where = self.config.image.symbolize(rip)
        text = f"guest exception {name} (error code {error:#x}) at rip={rip:#x}"
        text += f" ({where})" if where else ""
        text += f" rsp={rsp:#x} rflags={rflags:#x}"
        if vector == 14:
            sregs = kvm_abi.KvmSregs()
            kvm_abi.ioctl(vcpu.fd, kvm_abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
            access = "write" if error & 2 else "read"
            text += f" cr2={sregs.cr2:#x} ({access}{', not present' if not error & 1 else ''})"
        return text

    def _describe(self, vcpu: Vcpu, what: str) -> str:
        return f"vCPU {vcpu.id}: {what}; {self._registers(vcpu)}"

    def _registers(self, vcpu: Vcpu) -> str:
        regs = vcpu.regs()
        where = self.config.image.symbolize(regs.rip)
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
        for attr in ("_vm_fd", "_kvm_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def __enter__(self) -> "Machine":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
