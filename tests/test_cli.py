"""`spanvm run`: streams the console, exits with the guest's code, one clear line on bad input."""

import importlib.metadata
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guest_code import EXIT_7, HLT, NOP_LOOP, SPIN, exit_with, store_to
from spanvm.devcluster.paths import kubectl, repo_root
from spanvm.payloads.kernels import kernel_path
from spanvm.vmm.layout import MMIO_BASE, Doorbell
from spanvm_cli import spanvm

pytestmark = pytest.mark.kvm
PRINT_DOT = store_to(MMIO_BASE + Doorbell.PUTC, ord("."))


def test_run_streams_console_and_exits_zero() -> None:
    result = spanvm("run", "--vcpus", "2", "--memory", "256Mi", "smp-counter")
    assert result.returncode == 0, result.stderr
    assert "smp-counter: vcpus=2 n=100000 total=200000 expected=200000 OK" in result.stdout


def test_run_flat_binary_exit_code(tmp_path: Path) -> None:
    path = tmp_path / "exit7.bin"
    path.write_bytes(EXIT_7)
    assert spanvm("run", "--memory", "16Mi", str(path)).returncode == 7


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--memory", "lots", "hello"], "--memory: memory must be a quantity"),
        (["run", "--memory", "100M", "hello"], "--memory: memory must be a whole multiple of 2Mi"),
        (["run", "--memory", "66Gi", "hello"], "--memory: memory must be at most 64Gi"),
        (["run", "--vcpus", "0", "hello"], "--vcpus must be between 1 and"),
        (
            ["run", "--vcpus", "two", "hello"],
            "Invalid value for '--vcpus': 'two' is not a valid integer",
        ),
        (["run", "/no/such/file"], "no payload named '/no/such/file' and no file at that path"),
        (["run", "--vcpus", "1", "mp-litmus"], "payload mp-litmus needs --vcpus >= 2"),
        (["run", "--timeout", "0", "hello"], "--timeout must be a positive number of seconds"),
        (["run", "--timeout", "nan", "hello"], "--timeout must be a positive number of seconds"),
        (["run", "--arg", "-1", "smp-counter"], "--arg must be >= 0 and < 2**64"),
        (["run", "--arg", str(1 << 64), "smp-sum"], "--arg must be >= 0 and < 2**64"),
        (["run"], "give a payload name or file, --kernel KERNEL or --multiboot KERNEL"),
        (["run", "--initrd", "i.cpio", "hello"], "--initrd needs --kernel"),
        (["run", "--kernel", "vmlinux", "hello"], "--kernel boots Linux alone"),
        (
            ["run", "--kernel", "vmlinux", "--vcpus", "2", "--fragments", "2"],
            "Linux kernel vmlinux runs in one process for now",
        ),
        (
            ["operator", "--namespace", "team-*"],
            "'team-*' is not a namespace name (patterns are not supported",
        ),
        (["operator", "--namespace", " team"], "' team' is not a namespace name (lower-case"),
        (["operator", "--namespace", "Team"], "'Team' is not a namespace name (lower-case"),
        (["operator", "--namespace", ""], "an empty namespace (leave --namespace out"),
    ],
)
def test_bad_arguments_give_one_clear_line(args: list[str], needle: str) -> None:
    result = spanvm(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_payload_larger_than_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"\x90" * (20 << 20))
    result = spanvm("run", "--memory", "16Mi", str(path))
    assert result.returncode == 2  # bad arguments: refused before any KVM object exists
    assert result.stderr.strip().splitlines() == [
        f"spanvm: error: payload image {path} (20971520 bytes) and 1 vCPU stacks"
        " do not fit in 16 MiB of guest memory"
    ]


@pytest.mark.parametrize("fragments", [1, 2])
def test_an_image_that_cannot_fit_is_refused_by_its_size_unread(
    tmp_path: Path, fragments: int
) -> None:
    """A sparse 1 GiB image with 256 MiB of memory: refused from its size, so the process
    never holds the file (it used to read all of it, 1.1 GB resident, before refusing)."""
    path = tmp_path / "huge.bin"
    with path.open("wb") as f:
        f.truncate(1 << 30)
    env = {**os.environ, "PYTHONPATH": str(repo_root() / "operator")}
    command = [sys.executable, "-m", "spanvm.cli", "run", "--memory", "256Mi"]
    command += ["--fragments", str(fragments), "--vcpus", "2", str(path)]
    # A child's ru_maxrss counts the memory it had before exec, i.e. this (large) pytest
    # process's: measure it through a small forker that prints its child's own peak.
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_MAXRSS, *command],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert (
        f"payload image {path} (1073741824 bytes) and 2 vCPU stacks do not fit in"
        " 256 MiB of guest memory"
    ) in result.stderr
    max_rss = int(result.stdout.split("MAXRSS=")[1])  # KiB on Linux
    assert max_rss < 150 * 1024, f"max RSS {max_rss} KiB"


MEASURE_MAXRSS = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"MAXRSS={usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_silent_guest_times_out_saying_where(tmp_path: Path) -> None:
    path = tmp_path / "spin.bin"
    path.write_bytes(SPIN)
    result = spanvm("run", "--timeout", "1", "--vcpus", "2", str(path))
    assert result.returncode == 124
    assert "neither exited nor printed for 1s" in result.stderr
    assert "vCPU 0: rip=0x200000" in result.stderr and "vCPU 1: rip=0x200000" in result.stderr


def test_faulting_guest_is_a_vm_error(tmp_path: Path) -> None:
    path = tmp_path / "hlt.bin"
    path.write_bytes(HLT)
    result = spanvm("run", str(path))
    assert result.returncode == 70
    assert "vm error: vCPU 0: guest exception #GP general protection" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_across_fragments_streams_fragment_0s_console() -> None:
    result = spanvm(
        "run",
        "--fragments",
        "3",
        "--vcpus",
        "3",
        "--memory",
        "64Mi",
        "--arg",
        "2000",
        "smp-counter",
    )
    assert result.returncode == 0, result.stderr
    assert "smp-counter: vcpus=3 n=2000 total=6000 expected=6000 OK" in result.stdout
    assert "fragment 2 on local-2" in result.stderr


@pytest.mark.parametrize("fragments", ["3", "0", "-1"])
def test_fragments_outside_one_to_vcpus_is_a_usage_error(fragments: str) -> None:
    result = spanvm("run", "--fragments", fragments, "--vcpus", "2", "hello")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"spanvm: error: --fragments must be between 1 and --vcpus (2), got {fragments}"
    ]


def test_kvm_info_reports_what_the_agent_would_publish() -> None:
    result = spanvm("kvm-info")
    assert result.returncode == 0, result.stderr
    assert "KVM usable       yes" in result.stdout
    assert "label            spanvm.io/kvm=true" in result.stdout
    hidden = spanvm("kvm-info", "--device", "/nonexistent/kvm")
    assert (
        hidden.returncode == 1
        and "KVM usable       no: cannot open /nonexistent/kvm" in hidden.stdout
    )


def test_flat_binary_by_relative_path_across_fragments(tmp_path: Path) -> None:
    """Both vCPUs run the flat image; the code page reaches fragment 1 over the fabric."""
    (tmp_path / "exit7.bin").write_bytes(EXIT_7)
    result = spanvm(
        "run", "--fragments", "2", "--vcpus", "2", "--memory", "16Mi", "exit7.bin", cwd=tmp_path
    )
    assert result.returncode == 7, result.stderr


def test_a_guest_busy_with_exits_is_not_idle(tmp_path: Path) -> None:
    """--timeout counts exits to the monitor as activity, as its help says: a guest that
    writes the NOP doorbell for ever without printing is not stopped as idle."""
    path = tmp_path / "nop-loop.bin"
    path.write_bytes(PRINT_DOT + NOP_LOOP)  # one '.', then exits without printing
    env = {**os.environ, "PYTHONPATH": str(repo_root() / "operator")}
    process = subprocess.Popen(
        [sys.executable, "-m", "spanvm.cli", "run", "--timeout", "1", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    # The guest runs (and the stop signals are handled) once it printed: from then on, three
    # --timeout periods of exits and no output.
    ready, _, _ = select.select([process.stdout], [], [], 60)
    assert ready and process.stdout.read(1) == b".", "the guest did not start within 60 s"
    time.sleep(3)
    still_running = process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, raw_stderr = process.communicate(timeout=30)
    stderr = raw_stderr.decode()
    assert still_running, f"stopped as idle (status {process.returncode}): {stderr}"
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["spanvm: stopped by SIGTERM; the VM ended"]


@pytest.mark.parametrize("fragments", [1, 2])
def test_an_exit_code_above_255_does_not_look_like_success(tmp_path: Path, fragments: int) -> None:
    """256 used to wrap to 0. Now: status 125 and the full code on stderr. (The guest waits
    a moment before exiting: an exit at the first instruction across fragments is issue 20.2.)"""
    path = tmp_path / "exit256.bin"
    path.write_bytes(exit_with(256, delay_loops=100_000_000))
    result = spanvm(
        "run", "--fragments", str(fragments), "--vcpus", "2", "--memory", "16Mi", str(path)
    )
    assert result.returncode == 125, result.stderr
    assert (
        "spanvm: the guest exited with code 256 (0x100), which does not fit in an exit status;"
        " exiting with 125"
    ) in result.stderr.splitlines(), result.stderr
    if fragments == 1:  # the largest code that fits is still the status, silently
        path.write_bytes(exit_with(255))
        result = spanvm("run", "--memory", "16Mi", str(path))
        assert result.returncode == 255 and result.stderr == "", result.stderr


def test_run_kernel_boots_linux_protocol_with_initrd_and_cmdline(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"spanvm")
    kernel = kernel_path("zeropage-probe")
    result = spanvm(
        "run", "--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", "a=1 b", "--no-cx16"
    )
    assert result.returncode == 0, result.stderr
    assert "cmdline a=1 b\n" in result.stdout and " 0x6 fnv1a " in result.stdout


def test_run_kernel_refuses_a_file_that_is_no_kernel(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"MZ" + bytes(1000))
    result = spanvm("run", "--kernel", str(junk))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"spanvm: error: Linux kernel {junk}: neither an ELF vmlinux nor a bzImage (no ELF"
        " magic, no 'HdrS' setup header at 0x202)\n"
    )


def test_a_reader_that_goes_away_ends_it_quietly() -> None:
    """`spanvm kvm-info | head -1` used to end in a BrokenPipeError traceback: now status
    141 (128 + SIGPIPE, as a C program) and nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    env = {**os.environ, "PYTHONPATH": str(repo_root() / "operator")}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "spanvm.cli", "kvm-info"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            check=False,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert result.stderr == ""


def test_version_and_the_kubectl_plugin() -> None:
    expected = f"spanvm {importlib.metadata.version('spanvm')}"
    assert spanvm("--version").stdout.strip() == expected
    assert spanvm("version").stdout.strip() == expected
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "kubectl-spanvm").exists(), "reinstall the package: make venv"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    plugin = subprocess.run(
        [kubectl(), "spanvm", "version"], capture_output=True, text=True, env=env, check=False
    )
    assert plugin.returncode == 0, plugin.stderr
    assert plugin.stdout.strip() == expected
    usage = subprocess.run(
        [kubectl(), "spanvm", "status", "-o", "table"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert usage.returncode == 2
    assert usage.stderr.strip().endswith("(see 'kubectl spanvm status --help')"), usage.stderr


def test_shell_completion_of_commands() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(repo_root() / "operator"),
        "_SPANVM_COMPLETE": "bash_complete",
        "COMP_WORDS": "spanvm sta",
        "COMP_CWORD": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "spanvm.cli"], capture_output=True, text=True, env=env, check=False
    )
    assert result.stdout.split() == ["plain,start", "plain,status"], result.stderr
    script = spanvm("completion", "bash")
    assert script.returncode == 0 and "_SPANVM_COMPLETE=bash_complete" in script.stdout
