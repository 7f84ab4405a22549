#!/usr/bin/env python3
"""Memory fabric benchmark: remote page-fault service against its parts, in one run.

Prints one table. The ratios are what count (absolute times on shared machines are noise):
- remote fault p50/p99: a guest on fragment 1 streams through pages fragment 0 wrote
  (`stream`, home policy `first`), from reading the fault event to the page installed;
- local fault: the same guest in one process, each fault served by UFFDIO_COPY from a local
  buffer, measured between the same two points;
- raw round trip: a 24-byte request answered with a 4 KiB page between two Python processes
  over the same loopback path;
  ratio = remote / (local + raw), goal <= 1.3 (stretch 1.1); its p99 column is the same
  ratio of the p99s;
- streaming: remote pages/s seen by the guest, against one page per raw round trip, goal >= 4;
- smp-sum: 2 fragments x 1 vCPU against 1 fragment x 2 vCPUs (guest-timed, doorbell marks),
  goal <= 5; and the 3-fragment row: 3 fragments x 1 vCPU against 1 fragment x 3 vCPUs.
"""

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from spanvm.contract import Finished, FragmentEvent, last_of
from spanvm.fabric.coherence import READAHEAD
from spanvm.fabric.launcher import launch
from spanvm.fabric.uffd import PAGE_SIZE, Userfault
from spanvm.payloads.build import payload_image
from spanvm.vmm.layout import IMAGE_BASE
from spanvm.vmm.machine import Machine, VmConfig

MiB = 1 << 20
ECHO_SERVER = """
import socket, sys
srv = socket.create_server(("127.0.0.1", 0)); print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
page = bytes(4096 + 24)
while True:
    req = b""
    while len(req) < 24:
        chunk = conn.recv(24 - len(req))
        if not chunk: sys.exit(0)
        req += chunk
    conn.sendall(page)
"""


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def raw_round_trips(count: int) -> list[float]:
    server = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(bytes(24))
            got = 0
            while got < 4096 + 24:
                got += len(sock.recv(65536))
            samples.append(time.perf_counter() - started)
        sock.close()
        return samples
    finally:
        server.kill()
        server.wait()


def local_faults(memory: int) -> tuple[list[float], float]:
    """`stream` on one vCPU, every fault served by UFFDIO_COPY from a local buffer."""
    with Machine(VmConfig(memory, 1, payload_image("stream"))) as machine:
        mem = machine.memory
        assert mem is not None
        start = mem.host_address + mem.host_offset(IMAGE_BASE, PAGE_SIZE)
        uffd = Userfault(start, mem.host_address + mem.size - start)
        buffer = bytes(PAGE_SIZE)
        samples: list[float] = []
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                for fault in uffd.read_faults(0.05):
                    uffd.install(fault.address, buffer, writable=True)
                    samples.append(time.perf_counter() - fault.read_at)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        result = machine.run(idle_timeout=120)
        stop.set()
        server.join()
        uffd.close()
    assert result.ok, result.error
    pages = int(result.console.split("pages=")[1].split()[0])
    return samples, pages / marks_seconds([[v, value, t] for v, value, t in result.marks])


def fragment_run(  # noqa: PLR0917 - mirrors launch()
    payload: str,
    vcpus: int,
    fragments: int,
    memory: int,
    arg: int,
    policy: str,
    readahead: int = READAHEAD,
) -> tuple[list[Finished], str]:
    """Finished events of every fragment, and the console."""
    with (
        tempfile.TemporaryFile() as out,
        launch(
            payload,
            vcpus,
            memory,
            fragments,
            arg=arg,
            home_policy=policy,
            stdout=out,
            readahead=readahead,
            stderr=subprocess.DEVNULL,
        ) as vm,
    ):
        code = vm.wait(timeout=600)
        assert code == 0, f"{payload} on {fragments} fragments exited {code}"
        out.seek(0)
        console = out.read().decode()
    return [finished_of(f.events) for f in vm.fragments], console


def finished_of(events: list[FragmentEvent]) -> Finished:
    finished = last_of(events, Finished)
    assert finished is not None, f"no finished event in {events}"
    return finished


def marks_seconds(marks: Sequence[Sequence[float]], first: int = 0) -> float:
    """Seconds between doorbell marks `first` and `first + 1`."""
    by_value = {int(value): t for _, value, t in marks}
    return by_value[first + 1] - by_value[first]


def smp_sum_local(words: int, vcpus: int = 2) -> float:
    with Machine(VmConfig(256 * MiB, vcpus, payload_image("smp-sum"), words)) as machine:
        result = machine.run(idle_timeout=120)
    assert result.ok, result.error
    return marks_seconds([[v, value, t] for v, value, t in result.marks])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--memory", type=int, default=64, help="guest MiB for the streaming runs")
    parser.add_argument("--words", type=int, default=4 << 20, help="smp-sum array words")
    parser.add_argument("--round-trips", type=int, default=3000)
    args = parser.parse_args()
    memory = args.memory * MiB

    raw = raw_round_trips(args.round_trips)
    local, local_rate = local_faults(memory)
    # vCPU 0 (fragment 0) writes every heap page, then vCPU 1 (fragment 1) reads them all:
    # every page crosses the fabric (home policy `first`: all homed on fragment 0).
    single = fragment_run("stream", 2, 2, memory, 0, "first", readahead=1)[0][1]
    single_rate = single.fault_percentiles["remote_faults"] / marks_seconds(single.marks, 2)
    events, console = fragment_run("stream", 2, 2, memory, 0, "first")
    remote = events[1]
    pages = int(console.split("pages=")[1].split()[0])
    remote_rate = pages / marks_seconds(remote.marks, 2)
    span = marks_seconds(
        fragment_run("smp-sum", 2, 2, 256 * MiB, args.words, "proportional")[0][0].marks
    )
    one_fragment = smp_sum_local(args.words)
    span3 = marks_seconds(
        fragment_run("smp-sum", 3, 3, 256 * MiB, args.words, "proportional")[0][0].marks
    )
    one_fragment3 = smp_sum_local(args.words, 3)

    raw50, raw99 = pct(raw, 0.5) * 1e6, pct(raw, 0.99) * 1e6
    loc50, loc99 = pct(local, 0.5) * 1e6, pct(local, 0.99) * 1e6
    rem50, rem99 = (single.fault_percentiles[f"remote_fault_p{q}_us"] for q in (50, 99))
    batch50, batch99 = (remote.fault_percentiles[f"remote_fault_p{q}_us"] for q in (50, 99))
    one_per_rtt = 1e6 / raw50
    rows = [
        ("raw 4 KiB TCP round trip (us)", f"{raw50:.1f}", f"{raw99:.1f}", ""),
        (
            "local fault, UFFDIO_COPY (us)",
            f"{loc50:.1f}",
            f"{loc99:.1f}",
            f"{local_rate:,.0f} pages/s in guest",
        ),
        (
            "remote fault, 1 page (us)",
            f"{rem50:.1f}",
            f"{rem99:.1f}",
            f"{single_rate:,.0f} pages/s in guest",
        ),
        (
            f"remote fault, read-ahead {READAHEAD} (us)",
            f"{batch50:.1f}",
            f"{batch99:.1f}",
            f"{remote.counters.remote_faults} faults for {pages} pages",
        ),
        (
            "remote / (local + raw)",
            f"{rem50 / (loc50 + raw50):.2f}",
            f"{rem99 / (loc99 + raw99):.2f}",
            "goal <= 1.3 (stretch 1.1)",
        ),
        (
            "remote streaming pages/s",
            f"{remote_rate:,.0f}",
            "",
            f"{remote_rate / one_per_rtt:.2f}x one page per RTT (goal >= 4)",
        ),
        ("smp-sum 2 frag x 1 vCPU (s)", f"{span:.3f}", "", f"{args.words} words"),
        ("smp-sum 1 frag x 2 vCPU (s)", f"{one_fragment:.3f}", "", ""),
        ("smp-sum spanning / single", f"{span / one_fragment:.2f}", "", "goal <= 5"),
        ("smp-sum 3 frag x 1 vCPU (s)", f"{span3:.3f}", "", f"{args.words} words"),
        ("smp-sum 1 frag x 3 vCPU (s)", f"{one_fragment3:.3f}", "", ""),
        ("smp-sum 3 spanning / single", f"{span3 / one_fragment3:.2f}", "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':{width}}  {'p50 / value':>12}  {'p99':>10}  note")
    print("-" * (width + 60))
    for name, p50, p99, note in rows:
        print(f"{name:{width}}  {p50:>12}  {p99:>10}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
