"""Stopping `spanvm run`: SIGTERM, SIGINT, --timeout, a frozen fragment and a killed launcher
each end every fragment process within the documented bound, with one line saying why.

Real processes on real KVM: the guest is the `spin` payload (every vCPU spins forever without
an exit once vCPU 0 has printed its line)."""

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from spanvm.devcluster.paths import repo_root
from spanvm.fabric.launcher import STOP_GRACE
from spanvm.fabric.transport import PEER_HUNG_AFTER
from spanvm.procs import pid_alive

pytestmark = pytest.mark.kvm
SLACK = 3.0  # seconds on top of a bound: process start-up and a busy 2-core machine


@dataclass
class Run:
    """A `spanvm run` in a session of its own, its fragment processes once the guest spins."""

    process: subprocess.Popen[bytes]
    stderr_path: Path
    fragments: list[int]

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def messages(self) -> list[str]:
        """Lines spanvm itself wrote (not the fragments' timestamped log lines)."""
        return [line for line in self.stderr().splitlines() if line.startswith("spanvm")]


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def wait_for_line(stream: IO[bytes], needle: bytes, timeout: float) -> None:
    deadline, seen = time.monotonic() + timeout, b""
    fd = stream.fileno()
    while needle not in seen:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            raise AssertionError(f"no {needle!r} within {timeout}s; stdout so far: {seen!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"stdout closed before {needle!r}: {seen!r}")
        seen += chunk


@contextmanager
def spinning(tmp_path: Path, *args: str, fragments: int = 2) -> Iterator[Run]:
    """`spanvm run --fragments N --vcpus N ... spin`, yielded once the guest spins; anything
    still running at the end is killed (the test has failed by then)."""
    env = {**os.environ, "PYTHONPATH": str(repo_root() / "operator")}
    stderr_path = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "spanvm.cli", "run", "--memory", "32Mi"]
    command += ["--fragments", str(fragments), "--vcpus", str(max(fragments, 2)), *args, "spin"]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, env=env, start_new_session=True
        )
    run = Run(process, stderr_path, [])
    try:
        assert process.stdout is not None
        wait_for_line(process.stdout, b"vCPUs spinning", 60)
        run.fragments = children(process.pid)
        assert len(run.fragments) == (fragments if fragments > 1 else 0), run.fragments
        yield run
    finally:
        for pid in [process.pid, *run.fragments]:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def assert_all_gone(run: Run) -> None:
    survivors = [pid for pid in run.fragments if pid_alive(pid)]
    assert not survivors, f"fragments still running: {survivors}; stderr:\n{run.stderr()}"


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"]
)
def test_a_stop_signal_stops_every_fragment_saying_why(
    tmp_path: Path, sig: signal.Signals, status: int
) -> None:
    with spinning(tmp_path, "--timeout", "60") as run:
        sent = time.monotonic()
        run.process.send_signal(sig)
        code = run.process.wait(timeout=STOP_GRACE + SLACK)
        elapsed = time.monotonic() - sent
        time.sleep(0.5)  # an orphan would still be running now
        assert_all_gone(run)
    assert code == status, run.stderr()
    assert run.messages() == [f"spanvm: stopped by {sig.name}; every fragment ended"], run.stderr()
    assert "Traceback" not in run.stderr()
    assert elapsed < STOP_GRACE, f"took {elapsed:.1f}s"


def test_sigterm_stops_an_in_process_guest_saying_why(tmp_path: Path) -> None:
    with spinning(tmp_path, "--timeout", "60", fragments=1) as run:
        run.process.send_signal(signal.SIGTERM)
        code = run.process.wait(timeout=STOP_GRACE + SLACK)
    assert code == 143, run.stderr()
    assert run.messages() == ["spanvm: stopped by SIGTERM; the VM ended"], run.stderr()


def test_timeout_stops_every_fragment_with_one_line(tmp_path: Path) -> None:
    with spinning(tmp_path, "--timeout", "2") as run:
        code = run.process.wait(timeout=2 + STOP_GRACE + SLACK)
        time.sleep(0.5)
        assert_all_gone(run)
    assert code == 124, run.stderr()
    messages = run.messages()
    assert len(messages) == 1 and "neither exited nor printed for 2s" in messages[0], messages
    assert "vCPU 0: rip=" in messages[0]


def test_a_frozen_fragment_is_killed_and_named(tmp_path: Path) -> None:
    """Fragment 0 notices the silent peer (PEER_HUNG_AFTER) and ends; the launcher then gives
    the frozen fragment the grace period and kills it, naming it, instead of waiting for ever."""
    with spinning(tmp_path, "--timeout", "60") as run:
        frozen = run.fragments[1]
        os.kill(frozen, signal.SIGSTOP)
        # Bounded by this wait: the silence check, fragment 0's exit, the grace, the kill
        # (~17-18.5 s nominal; the slack is for a loaded machine, not a timing assertion).
        code = run.process.wait(timeout=PEER_HUNG_AFTER + STOP_GRACE + 3 * SLACK)
        assert_all_gone(run)
    assert code == 70, run.stderr()
    assert (
        f"spanvm: fragment 1 (pid {frozen}) was frozen (SIGSTOPped) and did not end within"
        f" {STOP_GRACE:g}s after another fragment ended; killed it"
    ) in run.messages(), run.stderr()
    assert "fragment 1 lost" in run.stderr()


def test_sigterm_with_a_frozen_fragment_kills_it_after_the_grace(tmp_path: Path) -> None:
    with spinning(tmp_path, "--timeout", "60") as run:
        frozen = run.fragments[1]
        os.kill(frozen, signal.SIGSTOP)
        run.process.send_signal(signal.SIGTERM)
        code = run.process.wait(timeout=STOP_GRACE + 2 * SLACK)  # the grace, then the kill
        assert_all_gone(run)
    assert code == 143, run.stderr()
    assert run.messages() == [
        f"spanvm: fragment 1 (pid {frozen}) was frozen (SIGSTOPped) and did not end within"
        f" {STOP_GRACE:g}s after it was asked to stop; killed it",
        "spanvm: stopped by SIGTERM; every fragment ended (some killed)",
    ], run.stderr()


def test_fragments_die_with_a_killed_launcher(tmp_path: Path) -> None:
    with spinning(tmp_path, "--timeout", "60") as run:
        run.process.kill()
        run.process.wait()
        deadline = time.monotonic() + 5
        while any(pid_alive(pid) for pid in run.fragments) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert_all_gone(run)
