#!/usr/bin/env python3
"""Fragment VMM benchmark: monitor overhead per exit and guest memory bandwidth at CPL3.

Prints one table; every figure is a ratio against a baseline measured in the same run, since
absolute times on shared machines are noise.

1. Exits/s: a guest doing N doorbell (MMIO) writes, run by the monitor, against a bare loop of
   KVM_RUN ioctls on the same kind of VM that only checks the exit reason.
2. Bandwidth: memtest's last pass (write + verify every heap byte, timed by the guest's NOP
   doorbell marks) against a host memmove of the same size between pre-touched buffers.
"""

import argparse
import ctypes
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from spanvm.payloads.build import PayloadImage, payload_image
from spanvm.vmm import kvm_abi
from spanvm.vmm.layout import MMIO_BASE, Doorbell
from spanvm.vmm.machine import Machine, VmConfig

MiB = 1 << 20


def doorbell_loop(count: int) -> bytes:
    """mov rcx, count; mov rax, NOP; 1: mov [rax], rcx; dec rcx; jnz 1b; then EXIT 0."""
    nop, exit_ = MMIO_BASE + Doorbell.NOP, MMIO_BASE + Doorbell.EXIT
    code = b"\x48\xb9" + struct.pack("<Q", count)  # movabs rcx, count
    code += b"\x48\xb8" + struct.pack("<Q", nop)  # movabs rax, nop
    code += b"\x48\x89\x08"  # mov [rax], rcx
    code += b"\x48\xff\xc9"  # dec rcx
    code += b"\x75\xf8"  # jnz -8
    code += b"\x48\xb8" + struct.pack("<Q", exit_) + b"\x48\xc7\x00\x00\x00\x00\x00"
    return code + b"\xeb\xfe"


def monitor_exits(image: PayloadImage, count: int) -> float:
    with Machine(VmConfig(32 * MiB, 1, image)) as machine:
        result = machine.run(idle_timeout=120)
    assert result.exit_code == 0, result.error
    return result.exits / result.wall_seconds


def bare_exits(image: PayloadImage, count: int) -> float:
    with Machine(VmConfig(32 * MiB, 1, image)) as machine:
        vcpu = machine.vcpus[0]
        started = time.monotonic()
        exits = 0
        while True:
            kvm_abi.libc.ioctl(vcpu.fd, kvm_abi.KVM_RUN, None)
            exits += 1
            if vcpu.run.exit_reason != kvm_abi.KVM_EXIT_MMIO:
                raise RuntimeError(kvm_abi.exit_name(vcpu.run.exit_reason))
            mmio = vcpu.exit_union(kvm_abi.KvmRunMmio)
            assert isinstance(mmio, kvm_abi.KvmRunMmio)
            if mmio.phys_addr == MMIO_BASE + Doorbell.EXIT:
                break
        return exits / (time.monotonic() - started)


def guest_bandwidth(memory: int, vcpus: int, passes: int) -> tuple[float, int]:
    with Machine(VmConfig(memory, vcpus, payload_image("memtest"), passes)) as machine:
        heap = sum(end - start for start, end in machine.layout.heap)
        result = machine.run(idle_timeout=120)
    assert result.ok and "errors=0" in result.console, result.error or result.console
    marks = {value: t for _, value, t in result.marks}
    last = passes - 1
    seconds = marks[2 * last + 1] - marks[2 * last]
    return 2 * heap / seconds, heap


def host_bandwidth(size: int, repeats: int) -> float:
    src = kvm_abi.mmap_anonymous(size)
    dst = kvm_abi.mmap_anonymous(size)
    try:
        ctypes.memset(src, 1, size)
        ctypes.memset(dst, 2, size)
        best = min(_timed(lambda: ctypes.memmove(dst, src, size)) for _ in range(repeats))
        return 2 * size / best
    finally:
        kvm_abi.munmap(src, size)
        kvm_abi.munmap(dst, size)


def _timed(fn: object) -> float:
    started = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exits", type=int, default=100_000, help="doorbell writes per run")
    parser.add_argument("--memory", type=int, default=512, help="guest MiB for memtest")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doorbell.bin"
        path.write_bytes(doorbell_loop(args.exits))
        image = PayloadImage.flat(path)
        monitor = statistics.median(monitor_exits(image, args.exits) for _ in range(args.repeats))
        bare = statistics.median(bare_exits(image, args.exits) for _ in range(args.repeats))

    guest1, heap = max(guest_bandwidth(args.memory * MiB, 1, 3) for _ in range(args.repeats))
    guest2, _ = max(guest_bandwidth(args.memory * MiB, 2, 3) for _ in range(args.repeats))
    host = host_bandwidth(heap, args.repeats * 2)

    rows = [
        ("exits/s, monitor (doorbell NOP)", f"{monitor:,.0f}", f"{1e6 / monitor:.1f} us/exit"),
        ("exits/s, bare KVM_RUN loop", f"{bare:,.0f}", f"{1e6 / bare:.1f} us/exit"),
        (
            "monitor / bare time per exit",
            f"{bare / monitor:.2f}x",
            f"+{1e6 / monitor - 1e6 / bare:.1f} us",
        ),
        ("memtest 1 vCPU (GB/s)", f"{guest1 / 1e9:.2f}", f"{heap / MiB:.0f} MiB heap"),
        ("memtest 2 vCPUs (GB/s)", f"{guest2 / 1e9:.2f}", ""),
        ("host memmove (GB/s)", f"{host / 1e9:.2f}", "same bytes"),
        ("guest 1 vCPU / host", f"{guest1 / host:.2f}", "goal >= 0.8"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':{width}}  {'value':>12}  note")
    print("-" * (width + 40))
    for name, value, note in rows:
        print(f"{name:{width}}  {value:>12}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
