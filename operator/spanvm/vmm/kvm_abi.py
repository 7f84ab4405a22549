"""The KVM ioctl ABI for x86-64 (linux/kvm.h): request numbers, structures, libc calls.

Structures are ctypes mirrors of the kernel's; ioctls go through libc's `ioctl` with
ctypes (which releases the GIL and returns the call's own result, unlike `fcntl.ioctl`).
"""

import ctypes
import ctypes.util
import os

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.ioctl.restype = ctypes.c_int
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.munmap.restype = ctypes.c_int
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x20, 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_DONTNEED = 4

KVMIO = 0xAE


def ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """Linux's _IOC(): an ioctl request number (direction 0 none, 1 write, 2 read, 3 both)."""
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def _ioc(direction: int, nr: int, size: int) -> int:
    return ioc(direction, KVMIO, nr, size)


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(1, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(2, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(3, nr, size)


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    ]


class KvmSregs(ctypes.Structure):
    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


REG_NAMES = (
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rsp",
    "rbp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rip",
    "rflags",
)


class KvmRegs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in REG_NAMES]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


MAX_CPUID_ENTRIES = 256


class KvmCpuid2(ctypes.Structure):
    _fields_ = [
        ("nent", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("entries", KvmCpuidEntry2 * MAX_CPUID_ENTRIES),
    ]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", ctypes.c_uint32)]


class KvmRunHeader(ctypes.Structure):
    """The fixed head of `struct kvm_run` (the exit union starts at offset 32)."""

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
    ]


class KvmRunIo(ctypes.Structure):
    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    ]


class KvmRunMmio(ctypes.Structure):
    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    ]


class KvmRunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", ctypes.c_uint64), ("cpu", ctypes.c_uint32)]


class KvmRunInternal(ctypes.Structure):
    _fields_ = [
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    ]


class KvmRunSystemEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    ]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 15)]


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", ctypes.c_uint32), ("level", ctypes.c_uint32)]


class KvmTranslation(ctypes.Structure):
    _fields_ = [
        ("linear_address", ctypes.c_uint64),
        ("physical_address", ctypes.c_uint64),
        ("valid", ctypes.c_uint8),
        ("writeable", ctypes.c_uint8),
        ("usermode", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    ]


class KvmLapicState(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_uint8 * 1024)]


class KvmFpu(ctypes.Structure):
    _fields_ = [
        ("fpr", ctypes.c_uint8 * 128),
        ("fcw", ctypes.c_uint16),
        ("fsw", ctypes.c_uint16),
        ("ftwx", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8),
        ("last_opcode", ctypes.c_uint16),
        ("last_ip", ctypes.c_uint64),
        ("last_dp", ctypes.c_uint64),
        ("xmm", ctypes.c_uint8 * 256),
        ("mxcsr", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


class KvmIrqRoutingIrqchip(ctypes.Structure):
    _fields_ = [
        ("irqchip", ctypes.c_uint32),
        ("pin", ctypes.c_uint32),
        ("pad", ctypes.c_uint32 * 6),
    ]


class KvmIrqRoutingEntry(ctypes.Structure):
    _fields_ = [
        ("gsi", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("u", KvmIrqRoutingIrqchip),
    ]


MAX_IRQ_ROUTES = 64


class KvmIrqRouting(ctypes.Structure):
    _fields_ = [
        ("nr", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("entries", KvmIrqRoutingEntry * MAX_IRQ_ROUTES),
    ]


class KvmMsi(ctypes.Structure):
    """struct kvm_msi (KVM_SIGNAL_MSI): an MSI address/data pair to deliver."""

    _fields_ = [
        ("address_lo", ctypes.c_uint32),
        ("address_hi", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("devid", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 12),
    ]


class KvmGuestDebug(ctypes.Structure):
    """struct kvm_guest_debug (KVM_SET_GUEST_DEBUG) with x86's eight debug registers."""

    _fields_ = [
        ("control", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("debugreg", ctypes.c_uint64 * 8),
    ]


class KvmVcpuEvents(ctypes.Structure):
    """struct kvm_vcpu_events (x86), the fields this monitor uses named, the rest kept as
    bytes so a get/set round trip carries them unchanged."""

    _fields_ = [
        ("exception", ctypes.c_uint8 * 8),
        ("interrupt", ctypes.c_uint8 * 4),
        ("nmi_injected", ctypes.c_uint8),
        ("nmi_pending", ctypes.c_uint8),
        ("nmi_masked", ctypes.c_uint8),
        ("nmi_pad", ctypes.c_uint8),
        ("sipi_vector", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("rest", ctypes.c_uint8 * 40),
    ]


class KvmDeviceAttr(ctypes.Structure):
    """struct kvm_device_attr (KVM_{GET,SET,HAS}_DEVICE_ATTR, here on a vCPU fd)."""

    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("group", ctypes.c_uint32),
        ("attr", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
    ]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("data", ctypes.c_uint64),
    ]


class KvmMsrs1(ctypes.Structure):
    """struct kvm_msrs with one entry (KVM_SET_MSRS)."""

    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("entry", KvmMsrEntry)]


class KvmMsrFilterRange(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("nmsrs", ctypes.c_uint32),
        ("base", ctypes.c_uint32),
        ("bitmap", ctypes.c_void_p),
    ]


class KvmMsrFilter(ctypes.Structure):
    """struct kvm_msr_filter (KVM_X86_SET_MSR_FILTER): up to 16 ranges; in a range's
    bitmap a 0 bit sends the guest's access to userspace."""

    _fields_ = [("flags", ctypes.c_uint32), ("ranges", KvmMsrFilterRange * 16)]


class KvmEnableCap(ctypes.Structure):
    _fields_ = [
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    ]


class KvmRunMsr(ctypes.Structure):
    """The `msr` member of kvm_run's exit union (KVM_EXIT_X86_RDMSR/WRMSR)."""

    _fields_ = [
        ("error", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 7),
        ("reason", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("data", ctypes.c_uint64),
    ]


KVM_EXIT_UNION_OFFSET = 32

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, ctypes.sizeof(KvmIrqLevel))
KVM_SET_GSI_ROUTING = _iow(0x6A, 8)
KVM_CREATE_PIT2 = _iow(0x77, ctypes.sizeof(KvmPitConfig))
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(KvmSregs))
KVM_TRANSLATE = _iowr(0x85, ctypes.sizeof(KvmTranslation))
KVM_SET_FPU = _iow(0x8D, ctypes.sizeof(KvmFpu))
KVM_GET_LAPIC = _ior(0x8E, ctypes.sizeof(KvmLapicState))
KVM_SET_LAPIC = _iow(0x8F, ctypes.sizeof(KvmLapicState))
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_SET_MP_STATE = _iow(0x99, ctypes.sizeof(KvmMpState))
KVM_SET_GUEST_DEBUG = _iow(0x9B, ctypes.sizeof(KvmGuestDebug))
KVM_GET_VCPU_EVENTS = _ior(0x9F, ctypes.sizeof(KvmVcpuEvents))
KVM_SET_VCPU_EVENTS = _iow(0xA0, ctypes.sizeof(KvmVcpuEvents))
KVM_SIGNAL_MSI = _iow(0xA5, ctypes.sizeof(KvmMsi))
KVM_SET_DEVICE_ATTR = _iow(0xE1, ctypes.sizeof(KvmDeviceAttr))
KVM_SET_MSRS = _iow(0x89, 8)
KVM_ENABLE_CAP = _iow(0xA3, ctypes.sizeof(KvmEnableCap))
KVM_X86_SET_MSR_FILTER = _iow(0xC6, ctypes.sizeof(KvmMsrFilter))
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_FILTER_WRITE = 1 << 1
MSR_IA32_APICBASE = 0x1B
APICBASE_ENABLE, APICBASE_X2APIC = 1 << 11, 1 << 10

KVM_API_VERSION = 12
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1  # an application processor waiting for INIT/SIPI
KVM_MP_STATE_HALTED = 3
KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP = 0x1, 0x2
KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET = 0, 0  # vCPU attribute group and attribute
KVM_PIT_SPEAKER_DUMMY = 1
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2

CAPABILITIES = {
    "IRQCHIP": 0,
    "HLT": 1,
    "USER_MEMORY": 3,
    "SET_TSS_ADDR": 4,
    "NR_VCPUS": 9,
    "NR_MEMSLOTS": 10,
    "MP_STATE": 14,
    "SPLIT_IRQCHIP": 121,
    "IMMEDIATE_EXIT": 136,
    "SIGNAL_MSI": 77,
    "MAX_VCPUS": 66,
}

EXIT_REASONS = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    3: "HYPERCALL",
    4: "DEBUG",
    5: "HLT",
    6: "MMIO",
    7: "IRQ_WINDOW_OPEN",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    10: "INTR",
    11: "SET_TPR",
    12: "TPR_ACCESS",
    17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT",
    25: "IOAPIC_EOI",
    29: "X86_RDMSR",
    30: "X86_WRMSR",
    33: "X86_BUS_LOCK",
    37: "NOTIFY",
}
KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_HLT, KVM_EXIT_SHUTDOWN = 2, 6, 5, 8
KVM_EXIT_DEBUG = 4
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTR, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_SYSTEM_EVENT = 9, 10, 17, 24


def exit_name(reason: int) -> str:
    """KVM_EXIT_<NAME> of an exit reason number."""
    return f"KVM_EXIT_{EXIT_REASONS.get(reason, f'#{reason}')}"


class KvmError(OSError):
    """A KVM ioctl failed; the message names the ioctl."""


def ioctl(
    fd: int,
    request: int,
    arg: int | ctypes.Structure | ctypes.Array[ctypes.c_char] | None = None,
    what: str = "",
    error: type[OSError] = KvmError,
) -> int:
    """Call ioctl(2); raise `error` naming `what` on failure, else return the result."""
    if isinstance(arg, ctypes.Structure | ctypes.Array):
        pointer: int | None = ctypes.addressof(arg)
    else:
        pointer = arg
    result: int = libc.ioctl(fd, request, pointer)
    if result < 0:
        err = ctypes.get_errno()
        raise error(err, f"{what or hex(request)}: {os.strerror(err)}")
    return result


def mmap_anonymous(size: int, shared: bool = False) -> int:
    """A fresh anonymous mapping (private by default, so MADV_DONTNEED drops pages)."""
    flags = (MAP_SHARED if shared else MAP_PRIVATE) | MAP_ANONYMOUS | MAP_NORESERVE
    address = libc.mmap(None, size, PROT_READ | PROT_WRITE, flags, -1, 0)
    if address in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size} bytes: {os.strerror(err)}")
    return int(address)


def mmap_fd(fd: int, size: int) -> int:
    """Map a KVM vCPU fd (the shared `struct kvm_run`)."""
    address = libc.mmap(None, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if address in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of vcpu fd: {os.strerror(err)}")
    return int(address)


def munmap(address: int, size: int) -> None:
    """Unmap a mapping made by mmap_anonymous or mmap_fd."""
    if libc.munmap(address, size) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munmap: {os.strerror(err)}")
