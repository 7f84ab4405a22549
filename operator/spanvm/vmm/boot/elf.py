"""Loadable contents of an ELF kernel image (Multiboot or Linux vmlinux), read with pyelftools.

Program headers per the System V ABI (gABI "Program Header": PT_LOAD segments are loaded at
their physical address `p_paddr`, `p_filesz` bytes of file data then zeros up to `p_memsz`);
function symbols from `.symtab` name addresses in error messages.
"""

import bisect
import io
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from spanvm.vmm.boot import BootError


@dataclass(frozen=True)
class Segment:
    """Bytes `data` at guest-physical `address`, zeros after them up to `memsz` bytes."""

    address: int
    data: bytes
    memsz: int

    @property
    def end(self) -> int:
        return self.address + self.memsz


@dataclass(frozen=True)
class ElfImage:
    """What a loader needs of an ELF kernel: its segments, entry point and function symbols
    (start, size, name), sorted by start."""

    segments: tuple[Segment, ...]
    entry: int
    symbols: tuple[tuple[int, int, str], ...]

    def symbolize(self, address: int) -> str:
        """`function+0xoff` for an address inside a known function, or ''."""
        i = bisect.bisect_right(self.symbols, (address, 1 << 64, "")) - 1
        if i >= 0:
            start, size, name = self.symbols[i]
            if address < start + max(size, 1):
                return f"{name}+{address - start:#x}"
        return ""


def read_elf(
    image: bytes, name: str, machines: tuple[str, ...], elfclass: int | None, expected: str
) -> ElfImage:
    """Parse `image`; BootError starting with `name` if it is not a valid ELF, not for one of
    `machines` (pyelftools names, e.g. "EM_X86_64") or `elfclass` (32/64, None: either:
    "ELF64 for EM_AARCH64, not `expected`"), has
    a segment whose file size exceeds its memory size, no loadable segment, or an entry point
    outside every segment."""
    try:
        elf = ELFFile(io.BytesIO(image))
        if elf["e_machine"] not in machines or elfclass not in (None, elf.elfclass):
            raise BootError(f"{name}: ELF{elf.elfclass} for {elf['e_machine']}, not {expected}")
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            if seg["p_filesz"] > seg["p_memsz"]:
                raise BootError(f"{name}: a segment's file size exceeds its memory size")
            segments.append(Segment(seg["p_paddr"], seg.data(), seg["p_memsz"]))
        symbols = []
        symtab = elf.get_section_by_name(".symtab")
        if isinstance(symtab, SymbolTableSection):
            for sym in symtab.iter_symbols():
                if sym["st_info"]["type"] == "STT_FUNC" and sym.name:
                    symbols.append((sym["st_value"], sym["st_size"], sym.name))
        entry = elf["e_entry"]
    except ELFError as err:
        raise BootError(f"{name}: not a valid ELF file ({err})") from None
    if not segments:
        raise BootError(f"{name}: no loadable segments")
    if not any(s.address <= entry < s.end for s in segments):
        raise BootError(f"{name}: entry {entry:#x} lies in no loadable segment")
    return ElfImage(tuple(segments), entry, tuple(sorted(symbols)))
