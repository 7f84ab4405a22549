#!/usr/bin/env python3
"""Interrupts across fragments: IPI round-trip latency against the raw fabric and a local IPI.

Prints one table of ratios measured in the same run (absolute times on a shared 2-core
machine are noise):

1. Cross-fragment IPI round trip: spanvm's IPI guest (devcluster/kut_guests/spanvm_ipi.c,
   kvm-unit-tests' library, CPL0) on 2 vCPUs in 2 fragments; CPU 0 sends a fixed IPI to CPU 1,
   whose handler answers with one; the guest reports TSC cycles per round trip (guest TSC =
   host TSC here, converted with the host's TSC frequency).
2. Local IPI round trip: the same guest with both vCPUs in one fragment (KVM's own delivery).
3. Raw fabric round trip on the same path: two processes, each a fabric `Transport` on
   loopback (authenticated handshake, the reader thread's dispatch), echoing an INTERRUPT
   frame; no guest, no KVM.
4. The fabric's own part of a round trip: each fragment logs the p50 time from its proxy's
   exit (the IPI caught) to KVM_SIGNAL_MSI returning in the fragment that delivers it (one
   host: one monotonic clock); twice that against the raw fabric round trip.
5. Page service under an IPI flood: the guest's vCPU in fragment 1 reads fresh pages homed on
   fragment 0 (remote faults), quietly and while CPU 0 floods it with IPIs (it keeps
   interrupts off, so only the fabric carries the flood).

Goal (issue 14): cross-fragment IPI round trip <= 2x the raw fabric round trip. On this
machine the guest's own IPI handling runs at emulated CPL0 (about 1.3 ms per round trip even
within one fragment), so row 4 is the figure the fabric path controls.
Usage: hack/bench/ipi.py [--rounds 3000] [--echoes 3000] [--pages 512]
"""

import argparse
import multiprocessing
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from spanvm.devcluster import kvm_unit_tests as kut
from spanvm.fabric.transport import Handlers, Transport
from spanvm.fabric.wire import Frame, Kind


def tsc_hz() -> float:
    """The host TSC's frequency as /proc/cpuinfo's "cpu MHz" gives it: in this VM (constant_tsc,
    tsc_known_freq, no frequency scaling) the TSC's; on a host that scales its clock, an
    approximation."""
    text = Path("/proc/cpuinfo").read_text()
    if "constant_tsc" not in text:
        raise SystemExit("this host's TSC is not constant: cycles cannot be converted")
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    if match is None:
        raise SystemExit("/proc/cpuinfo gives no cpu MHz")
    return float(match.group(1)) * 1e6


def run_guest(
    flat: Path, fragments: int, rounds: int, pages: int
) -> tuple[float, float, float, list[float]]:
    """(cycles per IPI round trip, walk cycles per page quiet, flooded, each fragment's
    catch-to-delivery p50 in µs as its log says)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = kut.write_env(Path(tmp) / "env", 2)
        cmdline = f"{rounds} 10 10 {pages}"
        cmd = kut.spanvm_command(flat, env, 2, fragments=fragments, timeout=120, cmdline=cmdline)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"spanvm_ipi on {fragments} fragment(s) failed:\n{done.stderr[-2000:]}")
    rtt = re.search(r"cycles per round trip: (\d+)", done.stdout)
    walk = re.search(r"walk cycles per page: quiet (\d+), flood (\d+)", done.stdout)
    if rtt is None or (pages and walk is None):
        raise SystemExit(f"spanvm_ipi printed no figures:\n{done.stdout[-2000:]}")
    quiet, flooded = (float(walk.group(1)), float(walk.group(2))) if walk else (0.0, 0.0)
    one_way = [float(m) for m in re.findall(r"catch-to-delivery p50 (\d+) µs", done.stderr)]
    return float(rtt.group(1)), quiet, flooded, one_way


def _unused(*_args: object) -> None:
    raise RuntimeError("no coherence traffic in this benchmark")


def _handlers(on_event: object) -> Handlers:
    return Handlers(_unused, lambda *_: False, _unused, _unused, on_event, _unused)  # type: ignore[arg-type]


def _echo(secret: bytes, endpoint: str, ready: "multiprocessing.synchronize.Event") -> None:
    """Fragment 1: connect to 0 and send every INTERRUPT frame back from its reader."""
    transport = Transport(1, 2, secret, _handlers(lambda peer, frame: None))
    transport.handlers = _handlers(transport.send)  # the frame goes back whence it came
    transport.listen("127.0.0.1")
    transport.connect({0: endpoint})
    transport.wait_connected()
    ready.set()
    time.sleep(3600)


def raw_fabric_rtts(echoes: int) -> list[float]:
    """Seconds per INTERRUPT frame echoed by another process's Transport, one at a time."""
    secret = secrets.token_bytes(32)
    back = threading.Event()
    transport = Transport(0, 2, secret, _handlers(lambda peer, frame: back.set()))
    endpoint = transport.listen("127.0.0.1")
    ready = multiprocessing.get_context("spawn").Event()
    child = multiprocessing.get_context("spawn").Process(
        target=_echo, args=(secret, endpoint, ready), daemon=True
    )
    child.start()
    try:
        transport.wait_connected()
        ready.wait(30)
        frame = Frame(Kind.INTERRUPT, page=1, request=0x40)
        samples = []
        for _ in range(echoes):
            back.clear()
            started = time.perf_counter()
            transport.send(1, frame)
            if not back.wait(5):
                raise SystemExit("the echo did not come back within 5 s")
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        child.kill()
        transport.close()


def _spin() -> None:
    while True:
        pass


def raw_fabric_rtts_one_core_busy(echoes: int) -> list[float]:
    """As raw_fabric_rtts while another process spins on a core, as the sending vCPU does
    during the guest's ping-pong (it waits for the answer in a busy loop)."""
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
    spinner.start()
    try:
        return raw_fabric_rtts(echoes)
    finally:
        spinner.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3000, help="IPI round trips per guest run")
    parser.add_argument("--echoes", type=int, default=3000, help="raw fabric round trips")
    parser.add_argument("--pages", type=int, default=512, help="pages per walk (max 4095)")
    args = parser.parse_args()
    hz = tsc_hz()
    flat = kut.build_guest("spanvm_ipi")
    local, _, _, _ = run_guest(flat, 1, args.rounds, 0)
    cross, quiet, flooded, one_way = run_guest(flat, 2, args.rounds, args.pages)
    # Means, as the guest's figure (total cycles / round trips) is one.
    raw = statistics.mean(raw_fabric_rtts(args.echoes))
    busy_us = statistics.mean(raw_fabric_rtts_one_core_busy(args.echoes)) * 1e6
    local_us, cross_us, raw_us = local / hz * 1e6, cross / hz * 1e6, raw * 1e6
    rows = [
        ("local IPI round trip (1 fragment)", local_us, "1.00 (baseline)"),
        ("cross-fragment IPI round trip (2 fragments)", cross_us, f"{cross_us / local_us:.2f}"),
        ("raw fabric round trip (Transport echo)", raw_us, f"{raw_us / local_us:.2f}"),
        ("raw fabric round trip, one core kept busy", busy_us, f"{busy_us / local_us:.2f}"),
    ]
    print(
        f"IPI round trips ({args.rounds} per guest, {args.echoes} echoes), TSC {hz / 1e6:.0f} MHz"
    )
    print("| path | µs per round trip | ratio to local |")
    print("|---|---|---|")
    for name, micros, ratio in rows:
        print(f"| {name} | {micros:.1f} | {ratio} |")
    print()
    print("| ratio | value | goal |")
    print("|---|---|---|")
    print(f"| cross-fragment IPI / raw fabric round trip | {cross_us / raw_us:.2f} | <= 2 |")
    added = (cross_us - local_us) / raw_us
    print(f"| (cross - local) / raw fabric round trip | {added:.2f} | what the fabric path adds |")
    if one_way:
        path = 2 * statistics.mean(one_way)
        print(
            f"| fabric path of a round trip (2 x catch-to-delivery p50 = {path:.0f} µs)"
            f" / raw fabric round trip | {path / raw_us:.2f} | <= 2 |"
        )
        print(
            f"| the same / raw fabric round trip with one core busy | {path / busy_us:.2f} | <= 2 |"
        )
    print(f"| remote page walk under an IPI flood / quiet | {flooded / quiet:.2f} | bounded |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
