"""The fragment VMM on real KVM: payload results, error paths, no leaks."""

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_code import (
    EXIT_7,
    HLT,
    MMIO_READ,
    PORT_OUT,
    SPIN,
    UD2,
    UNKNOWN_DOORBELL,
    WILD_WRITE,
)
from spanvm.payloads.build import PayloadImage, payload_image
from spanvm.vmm import layout
from spanvm.vmm.expected import smp_sum
from spanvm.vmm.machine import Machine, VmConfig, VmError, VmResult
from spanvm.vmm.probe import probe_kvm

pytestmark = pytest.mark.kvm
MiB = 1 << 20


def run(name: str, vcpus: int, arg: int, memory: int = 64 * MiB, timeout: float = 60) -> VmResult:
    with Machine(VmConfig(memory, vcpus, payload_image(name), arg)) as machine:
        return machine.run(idle_timeout=timeout)


def run_flat(tmp_path: Path, code: bytes, vcpus: int = 1, timeout: float = 60) -> VmResult:
    path = tmp_path / "guest.bin"
    path.write_bytes(code)
    with Machine(VmConfig(32 * MiB, vcpus, PayloadImage.flat(path))) as machine:
        return machine.run(idle_timeout=timeout)


def test_kvm_device_answers() -> None:
    probe = probe_kvm()
    assert probe.usable and probe.api_version == 12, probe.error
    caps = probe.capabilities
    assert caps["USER_MEMORY"] == 1 and caps["IMMEDIATE_EXIT"] == 1 and caps["IRQCHIP"] == 1


def test_hello_greets_from_every_vcpu() -> None:
    result = run("hello", 3, 0)
    assert result.ok, result.error
    assert result.console.splitlines() == [f"hello from vCPU {i} of 3" for i in range(3)]


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_smp_counter_total_is_exact(vcpus: int) -> None:
    """Also proves vCPUs run concurrently: KVM_RUN must release the GIL, else a vCPU spinning
    at the start barrier would hold it and the others could never arrive (a hang, not a pass)."""
    n = 200_000
    result = run("smp-counter", vcpus, n)
    assert result.ok, result.error + result.console if result.error else result.console
    assert f"total={vcpus * n} expected={vcpus * n} OK" in result.console


@pytest.mark.parametrize("vcpus", [1, 2, 3])
def test_smp_sum_matches_the_host(vcpus: int) -> None:
    words = 1 << 18
    result = run("smp-sum", vcpus, words)
    assert result.ok, result.error
    assert f"smp-sum: n={words} vcpus={vcpus} sum={smp_sum(words)}" in result.console


def test_smp_sum_too_large_for_memory_says_so() -> None:
    result = run("smp-sum", 2, 64 * MiB // 8)
    assert result.exit_code == 2
    assert "does not fit in guest memory" in result.console


@pytest.mark.parametrize("vcpus", [1, 2])
def test_memtest_verifies_every_free_byte(vcpus: int) -> None:
    memory = 64 * MiB
    with Machine(VmConfig(memory, vcpus, payload_image("memtest"), 2)) as machine:
        free = sum(end - start for start, end in machine.layout.heap)
        result = machine.run(idle_timeout=60)
    assert result.ok, result.error
    assert f"memtest: passes=2 bytes={2 * free} errors=0" in result.console
    assert [value for _, value, _ in result.marks] == [0, 1, 2, 3]


def test_memory_above_the_32bit_hole_is_usable() -> None:
    """3.5 GiB of RAM: 3 GiB at 0 and 512 MiB at 4 GiB, both handed to the payload."""
    with Machine(VmConfig(3584 * MiB, 1, payload_image("hello"))) as machine:
        assert [(r.gpa, r.size) for r in machine.memory.ranges] == [
            (0, 3 << 30),
            (4 << 30, 512 * MiB),
        ]  # type: ignore[union-attr]
        assert machine.layout.heap[-1] == (4 << 30, (4 << 30) + 512 * MiB)
        result = machine.run(idle_timeout=30)
    assert result.ok, result.error


def test_mp_litmus_never_sees_the_flag_without_the_data() -> None:
    result = run("mp-litmus", 2, 20_000)
    assert result.ok, result.error
    assert "mp-litmus: rounds=20000 violations=0" in result.console


def test_guest_exit_code_is_the_vm_exit_code(tmp_path: Path) -> None:
    result = run_flat(tmp_path, EXIT_7)
    assert result.error is None and result.exit_code == 7


@pytest.mark.parametrize(
    ("code", "needles"),
    [
        (HLT, ["vCPU 0: guest exception #GP general protection", "at rip=0x200000"]),
        (PORT_OUT, ["vCPU 0: guest exception #GP general protection", "at rip=0x200002"]),
        (UD2, ["vCPU 0: guest exception #UD invalid opcode", "at rip=0x200000"]),
        (WILD_WRITE, ["#PF page fault (error code 0x6)", "cr2=0x10000000 (write, not present)"]),
        (UNKNOWN_DOORBELL, ["vCPU 0", "unknown doorbell register 0x100", "rip="]),
        (
            MMIO_READ,
            ["vCPU 0", f"read from unmapped guest-physical address {layout.MMIO_BASE + 0x10:#x}"],
        ),
    ],
    ids=["hlt", "port-out", "ud2", "wild-write", "unknown-doorbell", "mmio-read"],
)
def test_guest_faults_stop_the_vm_naming_vcpu_and_cause(
    tmp_path: Path, code: bytes, needles: list[str]
) -> None:
    result = run_flat(tmp_path, code)
    assert result.exit_code is None and result.error
    for needle in needles:
        assert needle in result.error, result.error


def test_triple_fault_is_reported_as_shutdown(tmp_path: Path) -> None:
    """With the IDT wiped by the host, an exception cannot be delivered: a triple fault."""
    path = tmp_path / "hlt.bin"
    path.write_bytes(HLT)
    with Machine(VmConfig(32 * MiB, 1, PayloadImage.flat(path))) as machine:
        assert machine.memory is not None
        machine.memory.write(layout.IDT_BASE, bytes(4096))
        result = machine.run(idle_timeout=30)
    assert result.error and "vCPU 0: KVM_EXIT_SHUTDOWN (triple fault" in result.error


def test_idle_guest_is_stopped_saying_where_vcpus_were(tmp_path: Path) -> None:
    result = run_flat(tmp_path, SPIN, vcpus=2, timeout=0.5)
    assert result.timed_out and result.error
    assert "vCPU 0: rip=0x200000" in result.error and "vCPU 1: rip=0x200000" in result.error


def test_spin_in_a_named_function_is_symbolised() -> None:
    """mp-litmus's reader spins forever when the writer never runs: vCPU 1 alone here."""
    with Machine(
        VmConfig(64 * MiB, 2, payload_image("mp-litmus"), 10, local_vcpus=(1,))
    ) as machine:
        result = machine.run(idle_timeout=0.5)
    assert result.timed_out and result.error and "(payload_main+0x" in result.error


@pytest.mark.parametrize(
    ("memory", "vcpus", "needle"),
    [
        (33 * MiB, 1, "multiple of 2Mi"),
        (2 * MiB, 1, "do not fit"),
        (32 * MiB, 0, "vcpus must be between"),
        (65 << 30, 1, "not supported"),
    ],
)
def test_bad_sizes_are_refused_before_kvm(memory: int, vcpus: int, needle: str) -> None:
    with pytest.raises(VmError, match=needle):
        Machine(VmConfig(memory, vcpus, payload_image("hello")))


def test_missing_kvm_device_is_a_clear_error() -> None:
    with pytest.raises(VmError, match="cannot open /nonexistent/kvm"):
        Machine(VmConfig(32 * MiB, 1, payload_image("hello"), device="/nonexistent/kvm"))


@pytest.fixture
def resource_baseline() -> Iterator[tuple[set[str], int]]:
    yield set(os.listdir("/proc/self/fd")), threading.active_count()


def test_no_fds_threads_or_mappings_leak(
    tmp_path: Path, resource_baseline: tuple[set[str], int]
) -> None:
    fds, threads = resource_baseline
    maps_before = len(Path("/proc/self/maps").read_text().splitlines())
    for _ in range(3):
        assert run("smp-counter", 2, 1000).ok
        run_flat(tmp_path, HLT)
        run_flat(tmp_path, SPIN, vcpus=2, timeout=0.2)
        with pytest.raises(VmError):
            Machine(VmConfig(2 * MiB, 1, payload_image("hello")))
    assert set(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads
    assert len(Path("/proc/self/maps").read_text().splitlines()) <= maps_before + 2


KICK_DURING_CLOSE = """
import threading
from spanvm.payloads.build import payload_image
from spanvm.vmm.machine import Machine, VmConfig

for _ in range(30):
    machine = Machine(VmConfig(32 << 20, 4, payload_image("hello")))
    machine.run(idle_timeout=30)
    done = threading.Event()

    def fail_until_done() -> None:  # a fabric reader reporting a lost peer during shutdown
        while not done.is_set():
            machine.fail("peer lost")

    threads = [threading.Thread(target=fail_until_done) for _ in range(2)]
    for t in threads:
        t.start()
    machine.close()
    done.set()
    for t in threads:
        t.join()
print("closed 30 machines under kicks")
"""


def test_kicks_racing_close_never_touch_unmapped_kvm_run() -> None:
    """A fragment's reader thread may fail the VM (kicking every vCPU) while the fragment
    closes the machine; found as SIGSEGV in _ctypes writing kvm_run.immediate_exit after
    munmap. Run in a child: a crash must not take the test session with it."""
    result = subprocess.run(
        [sys.executable, "-c", KICK_DURING_CLOSE],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "closed 30 machines under kicks" in result.stdout
