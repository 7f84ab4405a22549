"""Memory-model litmus guests over 3 and 4 fragments (issue 12): message passing, store
buffering with fences, 2+2W, IRIW and a lock over a plain counter, each for hundreds to
thousands of rounds, with every shared variable homed on fragment 0 while other fragments play
the roles (requester, owner and home differ). Each must see only what one x86 machine allows.
Also the monitor reading guest memory held by another fragment (the console doorbell)."""

import subprocess
import sys
from pathlib import Path

import pytest

from test_fabric import run_local

pytestmark = [pytest.mark.kvm, pytest.mark.litmus]


@pytest.mark.parametrize(
    ("payload", "vcpus", "fragments", "rounds"),
    [
        ("litmus-mp", 3, 3, 1500),
        ("litmus-sb", 3, 3, 1000),
        ("litmus-2p2w", 3, 3, 1000),
        ("litmus-lock", 3, 3, 500),
        ("litmus-mp", 4, 4, 500),
        ("litmus-iriw", 5, 4, 500),
        ("litmus-lock", 4, 4, 200),
    ],
)
def test_litmus_outcomes_are_those_of_one_machine(
    tmp_path: Path, payload: str, vcpus: int, fragments: int, rounds: int
) -> None:
    code, console, log = run_local(tmp_path, payload, vcpus, fragments, rounds)
    assert f"{payload}: rounds={rounds} vcpus={vcpus} forbidden=0 OK" in console, (
        console[-2000:] + log[-3000:]
    )
    assert code == 0


@pytest.mark.parametrize("fragments", [2, 3])
def test_monitor_prints_a_line_held_by_another_fragment(tmp_path: Path, fragments: int) -> None:
    """The console doorbell makes the monitor read guest memory that the writer's fragment
    holds Modified; the read waits for the fabric instead of deadlocking the fragment."""
    code, console, log = run_local(tmp_path, "console-remote", fragments, fragments, 6)
    assert code == 0, log
    expected = ["".join(chr(ord("a") + (r + i) % 26) for i in range(32)) for r in range(1, 7)]
    assert console.splitlines() == expected


def test_hello_on_three_fragments_beside_cpu_hogs(tmp_path: Path) -> None:
    """Issue 12's deadlock input: 3-fragment hello with two CPU-bound processes beside it."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for run in range(5):
            (tmp_path / str(run)).mkdir()
            code, console, log = run_local(tmp_path / str(run), "hello", 3, 3, 0)
            assert code == 0, log
            assert console.splitlines() == [f"hello from vCPU {i} of 3" for i in range(3)]
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
