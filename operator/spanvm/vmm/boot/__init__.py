"""Boot sources: what a VM runs and the state its vCPUs start in.

One interface for today's ring-3 payloads (`payload.py`), Linux kernels (`linux.py`) and
Multiboot kernels such as kvm-unit-tests (`multiboot.py`), as kvmtool and Firecracker keep
their loaders apart from the VM. A boot source is checked (`check`) before any KVM object or
guest memory exists, so bad input never leaves a partial VM behind; then it writes guest
memory (`load`) and sets each local vCPU's registers (`setup_vcpu`).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from spanvm.vmm.errors import VmError
from spanvm.vmm.memory import GuestMemory
from spanvm.vmm.platform_shape import NumaNode
from spanvm.vmm.vcpu import Vcpu


class BootError(VmError):
    """A boot input is unusable; the message names the file (or option) and the reason."""


@dataclass(frozen=True)
class GuestShape:
    """The whole VM: RAM in bytes, vCPUs, and its NUMA nodes (one per fragment, proximity
    domain = fragment index; one node holding everything for a single-process VM)."""

    memory_size: int
    vcpu_count: int
    nodes: tuple[NumaNode, ...] = field(default_factory=tuple)


class BootSource(Protocol):
    """A loader for one kind of guest image."""

    @property
    def description(self) -> str:
        """What is booted, for messages: e.g. "multiboot kernel x86/apic.flat"."""
        ...

    @property
    def platform(self) -> bool:
        """True if the guest expects PC firmware tables (ACPI, MP) in the BIOS area."""
        ...

    def check(self, shape: GuestShape) -> None:
        """Read and validate the inputs for a guest of this shape; raise BootError."""
        ...

    def load(self, memory: GuestMemory, shape: GuestShape) -> None:
        """Write the image and its boot data into guest memory (after `check`)."""
        ...

    def setup_vcpu(self, vcpu: Vcpu, shape: GuestShape) -> None:
        """Give a local vCPU its first state (the boot vCPU runs; others may wait for SIPI)."""
        ...

    def symbolize(self, address: int) -> str:
        """`function+0xoff` for a guest address, or ''."""
        ...


def read_file(path: Path, what: str, limit: int | None = None) -> bytes:
    """The bytes of `path`; BootError naming it when missing, unreadable or over `limit`."""
    try:
        size = path.stat().st_size
        if limit is not None and size > limit:
            raise BootError(f"{what} {path}: {size} bytes do not fit in {limit} bytes")
        return path.read_bytes()
    except OSError as err:
        raise BootError(f"{what} {path}: {err.strerror}") from None
