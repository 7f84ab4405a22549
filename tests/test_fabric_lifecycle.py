"""How a spanning VM ends: an exit at once reaches every fragment before any connection
closes, and every failure names the fragment where it began and its kind (issue 12 and 20)."""

import signal
import time
from pathlib import Path

import pytest

from test_fabric import local_vm, run_local, wait_connected

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("fragments", [2, 3])
def test_a_guest_exiting_at_once_ends_every_fragment_cleanly(
    tmp_path: Path, fragments: int
) -> None:
    """vCPU 0 exits while the other fragments may still be joining (issue 20, item 2: exit
    status 70 in 7 of 18 runs, "fragment 0 lost: Broken pipe", a crash in Transport.close)."""
    for run in range(12):
        where = tmp_path / str(run)
        where.mkdir()
        code, _, log = run_local(where, "exit-now", fragments, fragments, 7)
        assert code == 7, log
        assert "lost" not in log and "Traceback" not in log, log


def test_a_resumed_fragment_does_not_blame_its_healthy_peer(tmp_path: Path) -> None:
    with local_vm(tmp_path, "smp-counter", 2, 2, 2_000_000_000) as (vm, _, err):
        wait_connected(vm)
        time.sleep(0.5)
        frozen = vm.fragments[1].process
        frozen.send_signal(signal.SIGSTOP)
        assert vm.fragments[0].process.wait(timeout=30) == 70
        frozen.send_signal(signal.SIGCONT)
        frozen.wait(timeout=30)
    log = err.read_text()
    assert "fragment 0: fragment 1 lost: silent for" in log, log
    assert "fragment 1 was frozen for" in log, log
    assert "spanvm fragment 1: fragment 0 reports: fragment 1 lost: silent" in log, log
    assert "fragment 0 lost" not in log, log  # the healthy peer is not blamed


@pytest.mark.parametrize("where", [0, 2])
def test_a_failure_names_the_fragment_where_it_began(tmp_path: Path, where: int) -> None:
    """A guest exception on fragment 0 (relayed to 2 by 1 as well) or on fragment 2 (which
    used to end without telling anyone: the others said "fragment 2 lost")."""
    code, _, log = run_local(tmp_path, "fault-now", 3, 3, where)
    assert code == 70, log
    for index in {0, 1, 2} - {where}:
        assert (
            f"spanvm fragment {index}: fragment {where} reports: vCPU {where}: guest exception"
            in log
        ), log
    assert "lost" not in log, log
