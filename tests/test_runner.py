"""The agent's fragment runner, without an API server: a fragment dies with its runner, and an
agent told to stop its fragments on exit (`stop_all`) leaves none running. Real processes on
real KVM running the `spin` payload."""

import os
import secrets
import signal
import time
from pathlib import Path

import pytest

from spanvm.agent.fragment_process import STOP_GRACE, FragmentProcess, stop_all
from spanvm.agent.runner import CONSOLE
from spanvm.contract import FragmentConfig
from spanvm.procs import pid_alive

pytestmark = pytest.mark.kvm
MiB = 1 << 20


def start_spin(directory: Path, name: str) -> FragmentProcess:
    """A one-fragment spin VM through the runner, returned once its guest spins."""
    config = FragmentConfig(
        index=0,
        fragment_count=1,
        vcpu_count=1,
        vcpu_ids=[0],
        memory=16 * MiB,
        payload="spin",
        homes=[(0, 16 * MiB, 0)],
        secret=secrets.token_hex(32),
        node_name="test",
    )
    meta = {"metadata": {"uid": f"uid-{name}", "namespace": "test", "name": name}}
    proc = FragmentProcess.launch(directory / name, meta, config.to_json())
    deadline = time.monotonic() + 60
    while b"vCPUs spinning" not in _read(proc.dir / CONSOLE):
        assert time.monotonic() < deadline, f"{name} never spun: {proc.events()}"
        time.sleep(0.1)
    assert pid_alive(proc.pids().get("fragment")), proc.pids()
    return proc


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_fragment_dies_with_its_runner(tmp_path: Path) -> None:
    proc = start_spin(tmp_path, "orphan")
    pids = proc.pids()
    try:
        os.kill(pids["runner"], signal.SIGKILL)
        assert wait_gone(pids["fragment"], 5), "the fragment outlived its runner"
    finally:
        if pid_alive(pids["fragment"]):
            os.kill(pids["fragment"], signal.SIGKILL)
        proc.reap()


def test_stop_all_stops_every_fragment_and_records_it(tmp_path: Path) -> None:
    procs = [start_spin(tmp_path, name) for name in ("one", "two")]
    fragment_pids = [p.pids()["fragment"] for p in procs]
    started = time.monotonic()
    try:
        assert stop_all(procs) == []
        assert time.monotonic() - started < STOP_GRACE, "a spinning guest needed SIGKILL"
        for proc, pid in zip(procs, fragment_pids, strict=True):
            assert not pid_alive(pid)
            assert proc.exit_status() == {"exit_code": 143}, proc.exit_status()
            assert proc.status(0).phase == "Stopped"
    finally:
        for pid in fragment_pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
