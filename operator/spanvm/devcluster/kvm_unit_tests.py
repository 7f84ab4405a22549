"""kvm-unit-tests under spanvm: build the pinned suite into the cache, run its tests with
`spanvm run --multiboot`, and compare with QEMU+KVM's results on this machine.

The suite (the KVM project's x86 tests: Multiboot kernels) is a read-only source snapshot in
`../shared/kvm-unit-tests` (its SPANVM-README.md gives the build recipe and what a VMM must
provide); QEMU's per-test results are in its BASELINE-qemu-kvm.md. Test definitions (file,
vCPUs, arguments) come from its `x86/unittests.cfg`. A test's verdict follows the suite's own
runner: exit code 0 PASS, 38 (77 >> 1) SKIP, anything else FAIL; a VM error is ERROR with the
VMM's message (an emulation failure names the instruction), an idle guest TIMEOUT.
"""

import configparser
import hashlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spanvm.devcluster.paths import cache_dir, repo_root
from spanvm.exitstatus import EXIT_TIMEOUT, EXIT_VM_ERROR

STAMP = ".spanvm-built"
SKIP_CODE = 38  # kvm-unit-tests' report_summary() exits 77 >> 1 when every check skipped
DEFAULT_MEMORY = "256Mi"
REGISTER_DUMP = re.compile(r" rsp=0x[0-9a-f]+( r[a-z]+=0x[0-9a-f]+)*")
PASS_LINE = re.compile(r"^(PASS|FAIL|SKIP|XFAIL|XPASS): (.*)$", re.M)


def source_dir() -> Path:
    """The pinned source snapshot beside the checkout: ../shared/kvm-unit-tests."""
    return repo_root().parent / "shared" / "kvm-unit-tests"


def build_dir() -> Path:
    return cache_dir() / "kvm-unit-tests" / "build"


def _shared_dir(source: Path) -> Path:
    """The machine-wide copy of a build, keyed by the snapshot's build inputs."""
    digest = hashlib.sha256()
    for name in ("configure", "Makefile", "x86/unittests.cfg", "x86/Makefile.common"):
        digest.update((source / name).read_bytes())
    return Path.home() / ".cache" / "spanvm" / f"kvm-unit-tests-{digest.hexdigest()[:12]}"


def build(source: Path | None = None, log: bool = True) -> Path:
    """The x86_64 build of the suite (49 `x86/*.flat`), built once into the cache (about 25 s
    on 2 cores): a copy of the read-only source with its flattened symlinks restored, then
    `./configure --arch=x86_64 && make -j2`. Returns the build folder. Raises RuntimeError
    with make's last lines when the build fails, FileNotFoundError when the source is absent."""
    source = source or source_dir()
    out = build_dir()
    stamp = out / STAMP
    if stamp.exists():
        return out
    if not (source / "configure").exists():
        raise FileNotFoundError(f"kvm-unit-tests source not found at {source}")
    if out.exists():
        shutil.rmtree(out)
    shared = _shared_dir(source)
    if (shared / STAMP).exists():
        shutil.copytree(shared, out, symlinks=True)
        return out
    shutil.copytree(source, out, symlinks=True)
    _restore_symlinks(out)
    if log:
        print(f"kvm-unit-tests: building {source} into {out}", file=sys.stderr)
    started = time.monotonic()
    for cmd in (["./configure", "--arch=x86_64"], ["make", "-j2"]):
        done = subprocess.run(cmd, cwd=out, capture_output=True, text=True, check=False)
        if done.returncode:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise RuntimeError(f"kvm-unit-tests: {' '.join(cmd)} failed:\n{tail}")
    stamp.write_text(f"built in {time.monotonic() - started:.1f}s\n")
    if not shared.exists():
        shutil.copytree(out, shared, symlinks=True)
    if log:
        print(f"kvm-unit-tests: built in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return out


GUESTS_DIR = Path(__file__).parent / "kut_guests"


def build_guest(name: str, tree: Path | None = None) -> Path:
    """spanvm's own test guest `kut_guests/<name>.c` (such as `spanvm_ipi`), compiled with
    the suite's x86 library and rules into `<tree>/x86/<name>.flat` (`tree`: build()'s);
    rebuilt only when its source changed. Returns the .flat path. RuntimeError with make's
    last lines on failure."""
    tree = tree or build(log=False)
    source = (GUESTS_DIR / f"{name}.c").read_bytes()
    copy, flat = tree / "x86" / f"{name}.c", tree / "x86" / f"{name}.flat"
    if flat.exists() and copy.exists() and copy.read_bytes() == source:
        return flat
    copy.write_bytes(source)
    flat.unlink(missing_ok=True)
    cmd = ["make", f"x86/{name}.flat"]
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode or not flat.exists():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise RuntimeError(f"kvm-unit-tests: {' '.join(cmd)} failed:\n{tail}")
    return flat


def _restore_symlinks(tree: Path) -> None:
    """The snapshot stores symlinks as small files holding the target path (x86/sieve.c holds
    `../common/sieve.c`); make them links again so the C sources compile."""
    for path in tree.rglob("*"):
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 200:
            continue
        target = path.read_text(errors="replace").strip()
        if "\n" in target or not target or target.startswith("#"):
            continue
        if (path.parent / target).is_file() and path.suffix == Path(target).suffix:
            path.unlink()
            path.symlink_to(target)


@dataclass(frozen=True)
class TestCase:
    """A `[name]` section of x86/unittests.cfg: the flat file, vCPUs, the guest's arguments
    (`test_args`, or `-append` in `extra_params`),
    and whether QEMU's `-cpu ...,-x2apic` hides x2APIC (spanvm run --no-x2apic)."""

    name: str
    file: str
    smp: int
    cmdline: str
    no_x2apic: bool = False


def test_cases(build: Path) -> dict[str, TestCase]:
    """Every x86_64 test of unittests.cfg, by name (numeric `smp` only; others get 1)."""
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    cfg.read(build / "x86" / "unittests.cfg")
    cases = {}
    for name in cfg.sections():
        section = cfg[name]
        if section.get("arch", "x86_64") != "x86_64":
            continue
        smp = section.get("smp", "1").strip()
        args = shlex.split(section.get("extra_params", ""))
        cmdline = args[args.index("-append") + 1] if "-append" in args[:-1] else ""
        cmdline = cmdline or " ".join(shlex.split(section.get("test_args", "")))
        no_x2apic = "-x2apic" in section.get("qemu_params", "")
        cases[name] = TestCase(
            name, section["file"], int(smp) if smp.isdigit() else 1, cmdline, no_x2apic
        )
    for flat in (build / "x86").glob("*.flat"):  # tests x86/run starts by file, e.g. dummy
        cases.setdefault(flat.stem, TestCase(flat.stem, flat.name, 1, ""))
    return cases


@dataclass(frozen=True)
class Outcome:
    """How one run ended: verdict, the guest's check lines, wall seconds, and detail."""

    verdict: str  # PASS, FAIL, SKIP, ERROR, TIMEOUT
    checks: tuple[str, ...]
    seconds: float
    detail: str
    console: str

    def summary(self) -> str:
        passed = sum(1 for c in self.checks if c.startswith("PASS"))
        failed = sum(1 for c in self.checks if c.startswith("FAIL"))
        text = f"{self.verdict} ({passed} pass"
        text += f", {failed} fail)" if failed else ")"
        return text + (f": {self.detail}" if self.detail else "")


def write_env(path: Path, vcpus: int) -> Path:
    """The environment module kvm-unit-tests reads (NR_CPUS and the rest, as its runner
    writes them); returns `path`."""
    path.write_text(f"NR_CPUS={vcpus}\nTEST_DEVICE=0\nBOOTLOADER=spanvm\n")
    return path


def spanvm_command(
    flat: Path,
    env_file: Path,
    vcpus: int,
    *,
    fragments: int = 1,
    timeout: float = 60.0,
    cmdline: str = "",
    no_x2apic: bool = False,
) -> list[str]:
    """The `spanvm run --multiboot` command line that boots a kvm-unit-tests kernel (one of
    the suite's or of `kut_guests/`) with its environment module."""
    cmd = [sys.executable, "-m", "spanvm", "run", "--multiboot", str(flat)]
    cmd += ["--module", str(env_file), "--vcpus", str(vcpus), "--memory", DEFAULT_MEMORY]
    cmd += ["--timeout", f"{timeout:g}", "--fragments", str(fragments)]
    if cmdline:
        cmd += ["--cmdline", cmdline]
    if no_x2apic:
        cmd.append("--no-x2apic")
    return cmd


def run_test(
    case: TestCase, build: Path, fragments: int = 1, timeout: float = 60.0, smp: int | None = None
) -> Outcome:
    """Run one test through `spanvm run --multiboot` in a child process."""
    vcpus = smp or case.smp
    env_file = write_env(build / f".env-{case.name}", vcpus)
    cmd = spanvm_command(
        build / "x86" / case.file,
        env_file,
        vcpus,
        fragments=fragments,
        timeout=timeout,
        cmdline=case.cmdline,
        no_x2apic=case.no_x2apic,
    )
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    checks = tuple(m.group(0) for m in PASS_LINE.finditer(done.stdout))
    errors = [line for line in done.stderr.splitlines() if line.startswith("spanvm")]
    detail = errors[-1].removeprefix("spanvm: ") if errors else ""
    if done.returncode == 0:
        verdict = "PASS"
    elif done.returncode == SKIP_CODE:
        verdict = "SKIP"
    elif done.returncode == EXIT_TIMEOUT:
        verdict = "TIMEOUT"
    elif done.returncode in (EXIT_VM_ERROR, 2):
        verdict = "ERROR"
    else:
        verdict = "FAIL"
        first_fail = next((c for c in checks if c.startswith("FAIL")), "")
        last_line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.strip()), "")
        detail = detail or first_fail or last_line
    detail = detail.replace(f"{build}/", "").split("; rip=")[0]  # the VMM's register dump:
    detail = REGISTER_DUMP.sub("", detail)  # keep rip and its symbol only
    return Outcome(verdict, checks, seconds, detail[:300], done.stdout)


def qemu_baseline(source: Path | None = None) -> dict[str, str]:
    """QEMU+KVM's result per test name from BASELINE-qemu-kvm.md ("PASS", "TIMEOUT"; a test
    run twice, stock and with `-arch-capabilities`, gives "SKIP/FAIL")."""
    text = ((source or source_dir()) / "BASELINE-qemu-kvm.md").read_text()
    kvm_part = text.split("**QEMU + TCG**")[0]
    out: dict[str, list[str]] = {}
    for row in re.finditer(r"^\| ([a-z0-9_ -]+?)(?: \([^)]*\))? \| ([A-Z]+) \|", kvm_part, re.M):
        out.setdefault(row.group(1).strip(), []).append(row.group(2))
    return {name: "/".join(results) for name, results in out.items()}
