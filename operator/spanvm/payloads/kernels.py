"""Builds spanvm's own ring-0 test kernels: ELF "vmlinux" images (linked at 16 MiB by
`src/kernel.ld`, entered at `src/kernel_entry.S`) that a Linux boot source loads and enters
through the 64-bit boot protocol.

Cached like the payloads, under `<cache>/kernels/<source hash>/NAME.elf`. Built with the
payloads' flags plus -mgeneral-regs-only: at the 64-bit entry CR4.OSFXSR is clear, so an SSE
instruction would fault.
"""

import os
import tempfile
from pathlib import Path

from spanvm.devcluster.paths import cache_dir
from spanvm.payloads.build import CFLAGS, SOURCE_DIR, _run, source_hash

KERNELS = ("zeropage-probe",)
KERNEL_CFLAGS = (
    *CFLAGS,
    "-mgeneral-regs-only",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,--no-warn-rwx-segments",
)


def kernel_path(name: str) -> Path:
    """The built ELF of test kernel `name`, building it if this source hash has none.
    KeyError for an unknown name; PayloadBuildError with gcc's output if the build fails."""
    if name not in KERNELS:
        raise KeyError(f"unknown test kernel {name!r}; known: {', '.join(KERNELS)}")
    out_dir = cache_dir() / "kernels" / source_hash()
    target = out_dir / f"{name}.elf"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        built = Path(tmp) / target.name
        _run(
            [
                os.environ.get("CC", "gcc"),
                *KERNEL_CFLAGS,
                "-T",
                str(SOURCE_DIR / "kernel.ld"),
                "-o",
                str(built),
                str(SOURCE_DIR / "kernel_entry.S"),
                str(SOURCE_DIR / (name.replace("-", "_") + ".c")),
            ]
        )
        os.chmod(built, 0o644)
        built.rename(target)  # atomic: a concurrent build writes the same bytes
    return target
