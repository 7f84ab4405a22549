#!/usr/bin/env python3
"""The remote page fault's floor: the fabric's system calls on the fabric's threads with no
protocol logic at all, in Python and in C, against fabric.py's baselines in the same run.

issue 15 asks remote / (local + raw) <= 1.3, where local and raw are fabric.py's Python
baselines (a fault served by UFFDIO_COPY in a KVM guest; a 24-byte request answered with
4 KiB between two Python processes). This asks how low any implementation of the present
design can go on this machine. A toucher thread stands in for the vCPU and reads one byte of
each page of a region registered with userfaultfd; a fault is timed as fabric.py times it,
from the fault thread reading the event to the page installed:
- `local (zero page, no KVM)`: the fault thread installs a zero page (UFFDIO_COPY), for
  scale only: the ratios divide by fabric.py's baselines, measured in the same run;
- `3 threads`: the fault thread sends a 24-byte request over loopback TCP; a home process
  write-protects its copy (UFFDIO_WRITEPROTECT), copies it and sends 24 bytes + the page; a
  reader thread receives and installs it: the fabric's threads, none of its decisions;
- `2 threads`: the same, the fault thread reading its own grant (issue 15's "the faulting
  thread sends the request and reads its own grant").
The Python floor uses the product's `Userfault` (read_faults, install, protect) and framing
sizes; the C floor is hack/bench/fault_floor.c, built with gcc into the cache on first use.
If the Python floor's ratio is above the goal, no protocol written in Python meets it here.
"""

import argparse
import ctypes
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fabric import local_faults, raw_round_trips

from spanvm.fabric.uffd import PAGE_SIZE, Userfault
from spanvm.fabric.wire import recv_exact
from spanvm.paths import cache_dir
from spanvm.vmm.memory import GuestMemory

MiB = 1 << 20
REQUEST = 24
SOURCE = Path(__file__).with_name("fault_floor.c")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-pthread")
MODES = ("local", "threads3", "threads2")
STALL = 10.0  # seconds without progress after which a floor run is declared stopped


def build_c() -> Path:
    """The C floor's binary, built under `<cache>/bench/<source hash>/` when missing.
    CalledProcessError (with gcc's output on stderr) if it does not compile."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    binary = cache_dir() / "bench" / digest / "fault_floor"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        subprocess.run(
            [os.environ.get("CC", "gcc"), *CFLAGS, "-o", str(partial), str(SOURCE)], check=True
        )
        partial.rename(binary)
    return binary


def c_floor(pages: int) -> dict[str, float]:
    """p50 µs of each mode of the C floor."""
    out = subprocess.run(
        [str(build_c()), str(pages), *MODES],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    return {mode: float(value) for mode, value in (line.split() for line in out.splitlines())}


def _region(pages: int) -> tuple[GuestMemory, Userfault]:
    memory = GuestMemory(pages * PAGE_SIZE)
    return memory, Userfault(memory.host_address, memory.size)


def home(port: int, pages: int) -> None:
    """The Python floor's home (run as `--home PORT PAGES`): answer each request with
    write-protect, copy, send, as the fabric's home serves a read of a page it holds."""
    memory, uffd = _region(pages)
    uffd.install(memory.host_address, None, writable=True, pages=pages)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        try:
            request = recv_exact(sock, REQUEST)
        except ConnectionError:
            return
        address = memory.host_address + int.from_bytes(request[:8], "little") * PAGE_SIZE
        uffd.protect(address)
        sock.sendall(request + ctypes.string_at(address, PAGE_SIZE))


def python_floor(mode: str, pages: int) -> float:
    """p50 µs of one mode of the Python floor. RuntimeError if the home or a thread stops
    (no fault within STALL seconds), rather than hanging."""
    memory, uffd = _region(pages)
    base = memory.host_address
    samples: list[float] = []
    asked_at: dict[int, float] = {}
    errors: list[BaseException] = []
    child = None
    sock = None
    if mode != "local":
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(STALL)
            port = listener.getsockname()[1]
            child = subprocess.Popen([sys.executable, __file__, "--home", str(port), str(pages)])
            sock, _ = listener.accept()  # TimeoutError if the home never connects
        sock.settimeout(STALL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def receive_grant() -> None:
        assert sock is not None
        grant = recv_exact(sock, REQUEST + PAGE_SIZE)
        page = int.from_bytes(grant[:8], "little")
        uffd.install(base + page * PAGE_SIZE, grant, writable=True, offset=REQUEST)
        samples.append(time.perf_counter() - asked_at.pop(page))

    def reader() -> None:
        while len(samples) < pages:
            receive_grant()

    def fault_loop() -> None:
        done = 0
        while done < pages:
            faults = uffd.read_faults(STALL)
            if not faults:
                raise RuntimeError(f"no fault within {STALL:.0f} s: the home or reader stopped")
            for fault in faults:
                page = (fault.address - base) // PAGE_SIZE
                done += 1
                if mode == "local":
                    uffd.install(fault.address, None, writable=True)
                    samples.append(time.perf_counter() - fault.read_at)
                    continue
                assert sock is not None
                asked_at[page] = fault.read_at
                sock.sendall(page.to_bytes(8, "little") + bytes(REQUEST - 8))
                if mode == "threads2":
                    receive_grant()

    word = ctypes.create_string_buffer(8)

    def toucher() -> None:  # memmove releases the GIL while it waits, as KVM_RUN does
        for page in range(pages):
            ctypes.memmove(word, base + page * PAGE_SIZE, 8)

    def recording(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as err:  # reported by the main thread
                errors.append(err)

        return run

    bodies = [fault_loop, reader] if mode == "threads3" else [fault_loop]
    # Daemons: a toucher left waiting on a page after a failure ends with the process.
    threads = [threading.Thread(target=recording(b), daemon=True) for b in bodies]
    threads.append(threading.Thread(target=toucher, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads[:-1]:
        thread.join()
    if errors:
        raise RuntimeError(f"Python floor, {mode}: {errors[0]}") from errors[0]
    threads[-1].join()
    if sock is not None and child is not None:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        child.wait(STALL)
    uffd.close()
    memory.close()
    return statistics.median(samples) * 1e6


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum` (a p50 of fewer samples says little)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pages", type=at_least(100), default=6000, help="faults per floor mode (%(default)s)"
    )
    parser.add_argument(
        "--round-trips",
        type=at_least(100),
        default=3000,
        help="raw round trips for the baseline (%(default)s)",
    )
    parser.add_argument("--home", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.home:
        home(*args.home)
        return 0
    raw = statistics.median(raw_round_trips(args.round_trips)) * 1e6
    local = statistics.median(local_faults(64 * MiB)[0]) * 1e6
    python = {mode: python_floor(mode, args.pages) for mode in MODES}
    c = c_floor(args.pages)
    baseline = local + raw
    print(
        f"baselines, measured now as fabric.py does (Python, KVM guest): raw round trip"
        f" {raw:.1f} us, local fault {local:.1f} us"
    )
    print(f"{'floor, p50 (us)':28}  {'Python':>8}  {'ratio':>6}  {'C':>8}  {'ratio':>6}")
    print("-" * 64)
    names = ("local (zero page, no KVM)", "remote, 3 threads", "remote, 2 threads")
    for mode, name in zip(MODES, names, strict=True):
        ratio = "" if mode == "local" else f"{python[mode] / baseline:6.2f}"
        c_ratio = "" if mode == "local" else f"{c[mode] / baseline:6.2f}"
        print(f"{name:28}  {python[mode]:8.1f}  {ratio:>6}  {c[mode]:8.1f}  {c_ratio:>6}")
    print(
        "ratio = remote floor / (the baselines' local fault + raw round trip), for Python and C"
        " alike;\nfabric.py's remote fault (the protocol) has goal <= 1.3"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
