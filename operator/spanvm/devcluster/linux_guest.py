"""`hack/linux-guest`: boot Debian's kernel under spanvm and print its console timeline.

Fetches the Debian kernel package (`linux-image-amd64`'s dependency) and `busybox-static`
with `apt-get download`, takes the vmlinuz out with `dpkg-deb`, unpacks the ELF vmlinux from
the bzImage payload with the VMM's own unpacker (vmm/boot/bzimage.py) and builds a busybox
initramfs (initramfs.py). Everything is kept in `.cache/linux-guest/` and in the machine-wide
`~/.cache/spanvm/linux-guest/`, built only when missing. Then it boots the kernel through
LinuxBoot with `console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr` plus what avoids
instructions this machine's KVM cannot emulate at CPL0 (CMPXCHG16B hidden from CPUID,
`noxsave` against XRSTOR) and prints each console line with the seconds since the VM
started, then a summary: first byte, banner, FPU line, where and why it stopped, exits/s.
"""

import argparse
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from spanvm.devcluster.initramfs import busybox_initramfs
from spanvm.devcluster.paths import cache_dir
from spanvm.vmm.boot import BootError
from spanvm.vmm.boot.bzimage import BzImage
from spanvm.vmm.boot.linux import LinuxBoot
from spanvm.vmm.cpuid import CpuidOptions
from spanvm.vmm.machine import Machine, VmConfig

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BASE_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr"
WORKAROUNDS = "noxsave"  # XRSTOR fails emulation here; FXSAVE/FXRSTOR do not
BANNER = "Linux version"
FPU_LINE = "x86/fpu: x87 FPU will use"
FILES = ("vmlinux", "initramfs.cpio", "package")
GiB = 1 << 30


@dataclass(frozen=True)
class GuestFiles:
    vmlinux: Path
    initramfs: Path
    package: str  # the Debian package and version the kernel came from


def shared_dir() -> Path:
    return Path.home() / ".cache" / "spanvm" / "linux-guest"


def ensure_guest(local: Path | None = None) -> GuestFiles:
    """The cached guest files, fetched and built if missing (apt-get, dpkg-deb)."""
    local = local or cache_dir() / "linux-guest"
    if not all((local / f).exists() for f in FILES):
        shared = shared_dir()
        if not all((shared / f).exists() for f in FILES):
            _build(shared)
        local.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copyfile(shared / name, local / name)
    return GuestFiles(
        local / "vmlinux", local / "initramfs.cpio", (local / "package").read_text().strip()
    )


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()}")
    return result.stdout


def _build(out: Path) -> None:
    depends = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    match = re.search(r"Depends: (linux-image-\S+)", depends)
    if match is None:
        raise RuntimeError(f"{KERNEL_META_PACKAGE} names no kernel package:\n{depends}")
    kernel_package = match.group(1)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp_name:
        tmp = Path(tmp_name)
        print(f"linux-guest: fetching {kernel_package} and {BUSYBOX_PACKAGE}", file=sys.stderr)
        _run(["apt-get", "download", kernel_package, BUSYBOX_PACKAGE], cwd=tmp)
        root = tmp / "root"
        for deb in sorted(tmp.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        kernel_deb = next(tmp.glob(f"{kernel_package}_*.deb"))
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        image = BzImage.parse(vmlinuz, vmlinuz.read_bytes())
        (tmp / "vmlinux").write_bytes(image.payload())
        busybox = (root / "bin" / "busybox").read_bytes()
        (tmp / "initramfs.cpio").write_bytes(busybox_initramfs(busybox))
        (tmp / "package").write_text(kernel_deb.name.removesuffix(".deb") + "\n")
        for name in FILES:
            (tmp / name).replace(out / name)


@dataclass
class Timeline:
    """Console lines with the seconds since the VM started, and when the milestones came."""

    started: float
    until: re.Pattern[str] | None
    on_until: threading.Event
    lines: list[tuple[float, str]] = field(default_factory=list)
    first_byte: float | None = None
    _partial: bytes = b""

    def feed(self, data: bytes) -> None:
        now = time.monotonic() - self.started
        if self.first_byte is None and data:
            self.first_byte = now
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace").rstrip("\r")
            self.lines.append((now, line))
            print(f"{now:8.2f}  {line}", flush=True)
            if self.until is not None and self.until.search(line):
                self.on_until.set()

    def when(self, needle: str) -> float | None:
        return next((t for t, line in self.lines if needle in line), None)


def boot(args: argparse.Namespace, files: GuestFiles) -> int:
    cmdline = " ".join(filter(None, (BASE_CMDLINE, WORKAROUNDS, args.append)))
    source = LinuxBoot(files.vmlinux, files.initramfs, cmdline)
    config = VmConfig(args.memory * GiB, 1, boot=source, cpuid=CpuidOptions(cx16=args.cx16))
    print(f"linux-guest: {files.package}; cmdline: {cmdline}", flush=True)
    reached = threading.Event()
    until = re.compile(args.until) if args.until else None
    timeline = Timeline(time.monotonic(), until, reached)
    rates: list[int] = []
    with Machine(config, console_sink=timeline.feed) as machine:

        def watch() -> None:  # exits per second, the --until stop and the --limit bound
            last = 0
            while not machine.stop_requested.wait(1.0):
                exits = sum(v.exits for v in machine.vcpus.values())
                rates.append(exits - last)
                last = exits
                if reached.is_set():
                    machine.finish(0)
                elif time.monotonic() - timeline.started > args.limit:
                    machine.fail(f"--limit of {args.limit:g}s reached")

        timeline.started = time.monotonic()
        threading.Thread(target=watch, daemon=True).start()
        result = machine.run(idle_timeout=args.timeout)
    banner, fpu = timeline.when(BANNER), timeline.when(FPU_LINE)

    def at(t: float | None) -> str:
        return "never" if t is None else f"{t:.1f} s"

    print("linux-guest summary")
    print(f"  first byte: {at(timeline.first_byte)}")
    print(f"  banner ('{BANNER}'): {at(banner)}")
    print(f"  FPU line ('{FPU_LINE}'): {at(fpu)}")
    last = timeline.lines[-1][1] if timeline.lines else "(none)"
    how = f"reached /{args.until}/" if reached.is_set() else result.error
    print(f"  stopped after {result.wall_seconds:.1f} s: {how}")
    print(f"  last console line: {last}")
    peak = max(rates, default=0)
    mean = result.exits / result.wall_seconds if result.wall_seconds else 0.0
    print(f"  exits: {result.exits} ({mean:.0f}/s on average, at most {peak}/s)")
    usage = resource.getrusage(resource.RUSAGE_SELF)  # KVM's emulation counts as system time
    print(f"  CPU: {usage.ru_utime + usage.ru_stime:.1f} s (the host is shared: wall > CPU)")
    return 0 if banner is not None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/linux-guest", description=__doc__)
    parser.add_argument("--memory", type=int, default=1, help="guest memory in GiB (default 1)")
    parser.add_argument("--append", default="", help="more kernel command-line options")
    parser.add_argument(
        "--cx16", action="store_true", help="leave CMPXCHG16B in CPUID (it stops the kernel)"
    )
    parser.add_argument("--until", help="stop the VM once a console line matches this regex")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="idle timeout in seconds (default 300)"
    )
    parser.add_argument(
        "--limit", type=float, default=900.0, help="stop after this many seconds (default 900)"
    )
    parser.add_argument("--fetch-only", action="store_true", help="build the cache and stop")
    args = parser.parse_args(argv)
    try:
        files = ensure_guest()
    except (RuntimeError, BootError, OSError, StopIteration) as err:
        print(f"linux-guest: error: {err}", file=sys.stderr)
        return 1
    if args.fetch_only:
        print(files.vmlinux.parent)
        return 0
    return boot(args, files)


if __name__ == "__main__":
    sys.exit(main())
