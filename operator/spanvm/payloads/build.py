"""Builds the guest payloads (freestanding C + an asm entry) into flat binaries with gcc.

Outputs are cached under `<cache>/payloads/<hash>/`, where the hash covers every source file
and the compiler flags, so a change to any source rebuilds and nothing else does. Each payload
gets `NAME.bin` (the flat image loaded at LOAD_ADDRESS) and `NAME.json` (entry, end of .bss,
symbols, so the monitor can say in which function a vCPU was).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from spanvm.paths import cache_dir
from spanvm.payloads.catalog import PAYLOAD_NAMES

SOURCE_DIR = Path(__file__).parent / "src"
LOAD_ADDRESS = 0x200000
CFLAGS = (
    "-O2",
    "-m64",
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-static",
    "-fno-pie",
    "-no-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-mno-red-zone",
    "-fno-pic",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
)


class PayloadBuildError(RuntimeError):
    """gcc or objcopy failed; the message carries the compiler output."""


@dataclass(frozen=True)
class PayloadImage:
    """A flat binary and what the monitor needs to know to load and describe it."""

    name: str
    path: Path
    load_address: int
    entry: int
    end: int  # first byte after .bss
    symbols: tuple[tuple[int, str], ...] = ()

    def symbolize(self, address: int) -> str:
        """`function+0xoff` for an address inside the image, or '' if none is known."""
        best: tuple[int, str] | None = None
        for start, name in self.symbols:
            if start <= address and (best is None or start > best[0]):
                best = (start, name)
        if best is None or not self.load_address <= address < self.end:
            return ""
        return f"{best[1]}+{address - best[0]:#x}"

    @classmethod
    def flat(cls, path: Path) -> "PayloadImage":
        """A user-supplied flat binary: loaded and entered at LOAD_ADDRESS."""
        size = path.stat().st_size
        return cls(path.name, path, LOAD_ADDRESS, LOAD_ADDRESS, LOAD_ADDRESS + size)


def _source_name(payload: str) -> str:
    return payload.replace("-", "_") + ".c"


def source_hash() -> str:
    """Hash of every payload source and the flags: the cache key."""
    digest = hashlib.sha256(" ".join(CFLAGS).encode())
    for path in sorted(SOURCE_DIR.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PayloadBuildError(f"{' '.join(cmd[:3])} ... failed:\n{result.stderr.strip()}")
    return result.stdout


def _build_one(name: str, out_dir: Path) -> None:
    src = SOURCE_DIR
    elf = out_dir / f"{name}.elf"
    _run(
        [
            os.environ.get("CC", "gcc"),
            *CFLAGS,
            "-I",
            str(src),
            "-T",
            str(src / "payload.ld"),
            "-o",
            str(elf),
            str(src / "entry.S"),
            str(src / "runtime.c"),
            str(src / _source_name(name)),
        ]
    )
    _run(
        [
            "objcopy",
            "-O",
            "binary",
            "--only-section=.text",
            "--only-section=.rodata",
            "--only-section=.data",
            str(elf),
            str(out_dir / f"{name}.bin"),
        ]
    )
    symbols: list[tuple[int, str]] = []
    entry = end = 0
    for line in _run(["nm", "--defined-only", str(elf)]).splitlines():
        address, kind, symbol = line.split()
        if symbol == "_start":
            entry = int(address, 16)
        if symbol == "_end":
            end = int(address, 16)
        if kind in "tT":
            symbols.append((int(address, 16), symbol))
    manifest = {
        "entry": entry,
        "end": end,
        "load_address": LOAD_ADDRESS,
        "symbols": sorted(symbols),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(manifest))
    elf.unlink()


def build_all() -> Path:
    """Build every payload unless the cache already holds this source hash; returns the folder."""
    out_dir = cache_dir() / "payloads" / source_hash()
    if all((out_dir / f"{n}.json").exists() for n in PAYLOAD_NAMES):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        for name in PAYLOAD_NAMES:
            _build_one(name, Path(tmp))
        os.chmod(tmp, 0o755)
        try:
            Path(tmp).rename(out_dir)
        except OSError:  # a concurrent build got there first; its output is the same
            if not out_dir.exists():
                raise
    return out_dir


def payload_image(name: str) -> PayloadImage:
    """The built image of a catalogued payload (building the set if needed)."""
    if name not in PAYLOAD_NAMES:
        raise KeyError(f"unknown payload {name!r}; known: {', '.join(PAYLOAD_NAMES)}")
    out_dir = build_all()
    manifest = json.loads((out_dir / f"{name}.json").read_text())
    return PayloadImage(
        name=name,
        path=out_dir / f"{name}.bin",
        load_address=manifest["load_address"],
        entry=manifest["entry"],
        end=manifest["end"],
        symbols=tuple((a, s) for a, s in manifest["symbols"]),
    )


def resolve_image(payload: str) -> PayloadImage:
    """A catalogued payload by name, else the flat binary at that path (made absolute, so a
    fragment started elsewhere finds it); ValueError saying why neither fits."""
    if payload in PAYLOAD_NAMES:
        return payload_image(payload)
    path = Path(payload)
    if not path.is_file():
        raise ValueError(
            f"no payload named {payload!r} and no file at that path"
            f" (payloads: {', '.join(PAYLOAD_NAMES)})"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"{payload} is empty")
    return PayloadImage.flat(path.resolve())


def main(argv: list[str] | None = None) -> int:
    """`python -m spanvm.payloads.build`: build (if needed) and print the output folder."""
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    try:
        print(build_all())
    except PayloadBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
