"""userfaultfd(2) for guest RAM: MISSING and write-protect faults, page install/protect/drop.

Guest accesses to a page this fragment lacks arrive here (KVM faults on the host mapping);
the fabric resolves them with UFFDIO_COPY, UFFDIO_WRITEPROTECT or UFFDIO_WAKE, and drops
pages with MADV_DONTNEED (which also zaps KVM's mapping of them).
"""

import ctypes
import errno
import os
import select
import struct
import time
from dataclasses import dataclass
from typing import Protocol

from spanvm.vmm.kvm_abi import MADV_DONTNEED, ioc, libc

PAGE_SIZE = 4096
SYS_USERFAULTFD = 323
UFFD_API = 0xAA
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP = 1, 2
UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_COPY_MODE_WP = 1, 2
UFFDIO_WRITEPROTECT_MODE_WP, UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1, 2
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE, UFFD_PAGEFAULT_FLAG_WP = 1, 2
O_CLOEXEC, O_NONBLOCK = 0o2000000, 0o4000


def _ioc(direction: int, nr: int, size: int) -> int:
    return ioc(direction, UFFD_API, nr, size)


class UffdioApi(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioCopy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


class UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64)]


# struct uffd_msg (linux/userfaultfd.h), 32 bytes: event, 7 reserved bytes, then for a page
# fault its flags, address and (UFFD_FEATURE_THREAD_ID) the faulting thread's id.
UFFD_MSG = struct.Struct("<B7xQQI4x")
READ_BATCH = 16  # events one read(2) takes at most


UFFDIO_API_IOCTL = _ioc(3, 0x3F, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = _ioc(3, 0x00, ctypes.sizeof(UffdioRegister))
UFFDIO_UNREGISTER = _ioc(2, 0x01, ctypes.sizeof(UffdioRange))
UFFDIO_WAKE = _ioc(2, 0x02, ctypes.sizeof(UffdioRange))
UFFDIO_COPY = _ioc(3, 0x03, ctypes.sizeof(UffdioCopy))
UFFDIO_WRITEPROTECT = _ioc(3, 0x06, ctypes.sizeof(UffdioWriteprotect))

libc.syscall.restype = ctypes.c_long


_ZEROS = bytes(64 * PAGE_SIZE)  # read-only source of zero pages (a batch is at most 64)


def _zeros(length: int) -> bytes:
    return _ZEROS if length <= len(_ZEROS) else bytes(length)


class UffdError(OSError):
    """A userfaultfd operation failed."""


@dataclass(frozen=True)
class Fault:
    """One guest page fault: the host address and whether it was a write / a WP fault."""

    address: int
    write: bool
    wp: bool
    read_at: float  # time.perf_counter() when the event was read (fault service starts)
    thread: int = 0  # the faulting thread's id (each vCPU's accesses form their own stream)


class Kernel(Protocol):
    """The system calls `Userfault` makes, so that a test can run the real class over a
    simulated kernel (tests/coherence_explorer.py). Each returns what the call returned, or
    minus errno on failure, as the raw syscall does."""

    def userfaultfd(self, flags: int) -> int: ...

    def ioctl(self, fd: int, request: int, arg: int) -> int: ...

    def madvise(self, address: int, length: int, advice: int) -> int: ...

    def close(self, fd: int) -> None: ...


class LinuxKernel:
    """The real calls, through libc (each releases the GIL while it runs)."""

    def userfaultfd(self, flags: int) -> int:
        fd = int(libc.syscall(SYS_USERFAULTFD, flags))
        return fd if fd >= 0 else -ctypes.get_errno()

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        result = int(libc.ioctl(fd, request, arg))
        return result if result >= 0 else -ctypes.get_errno()

    def madvise(self, address: int, length: int, advice: int) -> int:
        result = int(libc.madvise(address, length, advice))
        return result if result == 0 else -ctypes.get_errno()

    def close(self, fd: int) -> None:
        os.close(fd)


LINUX = LinuxKernel()


class Userfault:
    """One userfaultfd over a host mapping, registered for MISSING and WP faults. Its methods
    may be called from several threads at once (the fault thread, readers, home workers)."""

    def __init__(self, start: int, length: int, kernel: Kernel = LINUX) -> None:
        self.kernel = kernel
        fd = kernel.userfaultfd(O_CLOEXEC | O_NONBLOCK)
        if fd < 0:
            raise UffdError(-fd, f"userfaultfd: {os.strerror(-fd)}")
        self.fd = fd
        self.start, self.length = start, length
        try:
            api = UffdioApi(
                api=UFFD_API, features=UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_THREAD_ID
            )
            self._ioctl(UFFDIO_API_IOCTL, api, "UFFDIO_API")
            reg = UffdioRegister(
                range=UffdioRange(start, length),
                mode=UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
            )
            self._ioctl(UFFDIO_REGISTER, reg, "UFFDIO_REGISTER")
        except BaseException:
            kernel.close(self.fd)
            raise

    def _ioctl(self, request: int, arg: ctypes.Structure, what: str) -> int:
        result = self.kernel.ioctl(self.fd, request, ctypes.addressof(arg))
        if result < 0:
            raise UffdError(-result, f"{what}: {os.strerror(-result)}")
        return result

    def close(self) -> None:
        """Close the fd; faults still waiting are released (the VM is stopping by then)."""
        if self.fd >= 0:
            self.kernel.close(self.fd)
            self.fd = -1

    def read_faults(self, timeout: float) -> list[Fault]:
        """Faults pending now, waiting up to `timeout` seconds for the first (real kernel).
        One read(2) takes up to READ_BATCH events (userfaultfd(2): a read returns as many
        whole `struct uffd_msg` as fit); a full batch is followed by another read."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        now = time.perf_counter()
        faults: list[Fault] = []
        while True:
            try:
                data = os.read(self.fd, UFFD_MSG.size * READ_BATCH)
            except BlockingIOError:  # EAGAIN (os.read retries EINTR itself, PEP 475)
                return faults
            except OSError as err:
                raise UffdError(err.errno, f"read from userfaultfd: {err.strerror}") from None
            for event, flags, address, ptid in UFFD_MSG.iter_unpack(data):
                if event == UFFD_EVENT_PAGEFAULT:
                    faults.append(
                        Fault(
                            address & ~(PAGE_SIZE - 1),
                            bool(flags & UFFD_PAGEFAULT_FLAG_WRITE),
                            bool(flags & UFFD_PAGEFAULT_FLAG_WP),
                            now,
                            ptid,
                        )
                    )
            if len(data) < UFFD_MSG.size * READ_BATCH:
                return faults  # the queue is empty

    def install(
        self, address: int, data: bytes | None, writable: bool, pages: int = 1, offset: int = 0
    ) -> bool:
        """Map `pages` contiguous pages with `data` from `offset` (zeros if None),
        write-protected unless writable, in one ioctl; wakes the faulting threads. False if
        already present.

        The kernel copies straight from `data` (an immutable bytes object, alive for the
        call) or from a shared zero buffer that nobody writes: no staging buffer, which
        several threads installing at once would overwrite under each other (the call
        releases the GIL between filling such a buffer and the copy)."""
        length = pages * PAGE_SIZE
        if data is None:
            source = _zeros(length)
        else:
            if len(data) - offset < length:
                raise ValueError(f"install of {pages} pages given {len(data) - offset} bytes")
            source = data
        copy = UffdioCopy(
            dst=address,
            src=(ctypes.cast(ctypes.c_char_p(source), ctypes.c_void_p).value or 0) + offset,
            len=length,
            mode=0 if writable else UFFDIO_COPY_MODE_WP,
        )
        result = self.kernel.ioctl(self.fd, UFFDIO_COPY, ctypes.addressof(copy))
        if result < 0:
            if -result == errno.EEXIST:
                self.wake(address)
                return False
            raise UffdError(-result, f"UFFDIO_COPY at {address:#x}: {os.strerror(-result)}")
        return True

    def protect(self, address: int, pages: int = 1) -> None:
        """Write-protect present pages (their next guest write faults with WP)."""
        wp = UffdioWriteprotect(
            range=UffdioRange(address, pages * PAGE_SIZE), mode=UFFDIO_WRITEPROTECT_MODE_WP
        )
        self._ioctl(UFFDIO_WRITEPROTECT, wp, "UFFDIO_WRITEPROTECT")

    def unprotect(self, address: int) -> None:
        """Make a present page writable again and wake threads waiting on it."""
        wp = UffdioWriteprotect(range=UffdioRange(address, PAGE_SIZE), mode=0)
        self._ioctl(UFFDIO_WRITEPROTECT, wp, "UFFDIO_WRITEPROTECT")

    def wake(self, address: int) -> None:
        """Wake threads waiting on a page that is already resolved."""
        self._ioctl(UFFDIO_WAKE, UffdioRange(address, PAGE_SIZE), "UFFDIO_WAKE")

    def drop(self, address: int, pages: int = 1) -> None:
        """Drop `pages` contiguous pages (MADV_DONTNEED, one call): their next access faults
        as MISSING."""
        result = self.kernel.madvise(address, pages * PAGE_SIZE, MADV_DONTNEED)
        if result < 0:
            raise UffdError(-result, f"madvise(DONTNEED) at {address:#x}: {os.strerror(-result)}")
