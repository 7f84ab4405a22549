"""Reading a Linux bzImage: its real-mode setup header and its compressed payload.

Source: Linux Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header" (the field
offsets below, all absolute offsets in the file and in `struct boot_params`), "Details of
Header Fields" (setup_sects 0 means 4; cmdline_size; payload_offset/payload_length, "the
payload may be compressed ... the format of the uncompressed data should be determined using
the standard magic numbers", and the uncompressed payload is currently always ELF) and the
protocol history at its top (2.08 added the payload fields, 2.10 pref_address and init_size,
2.12 xloadflags, whose XLF_KERNEL_64 says the kernel has the 64-bit entry at +0x200).

The payload is unpacked here, in the VMM, so that no decompressor runs in the guest (on this
machine's KVM the guest kernel mode is emulated and the XZ decompressor never finishes).
Compressed streams carry a 4-byte size trailer (the kernel's `size_append`), which the
decompressors here leave as unused data.
"""

import lzma
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from spanvm.vmm.boot import BootError

HEADER_MAGIC = b"HdrS"
HEADER_MAGIC_OFFSET = 0x202
SETUP_HEADER_OFFSET = 0x1F1
MIN_VERSION = 0x020C  # 2.12: xloadflags (XLF_KERNEL_64) and the payload fields are present
XLF_KERNEL_64 = 1 << 0
SECTOR = 512

# Setup header fields: (offset, struct format), boot.rst "The Real-Mode Kernel Header".
SETUP_SECTS = (0x1F1, "<B")
BOOT_FLAG = (0x1FE, "<H")
JUMP_END = (0x201, "<B")  # the header ends at 0x202 + this byte
VERSION = (0x206, "<H")
TYPE_OF_LOADER = (0x210, "<B")
LOADFLAGS = (0x211, "<B")
RAMDISK_IMAGE = (0x218, "<I")
RAMDISK_SIZE = (0x21C, "<I")
CMD_LINE_PTR = (0x228, "<I")
INITRD_ADDR_MAX = (0x22C, "<I")
KERNEL_ALIGNMENT = (0x230, "<I")
XLOADFLAGS = (0x236, "<H")
CMDLINE_SIZE = (0x238, "<I")
PAYLOAD_OFFSET = (0x248, "<I")
PAYLOAD_LENGTH = (0x24C, "<I")
PREF_ADDRESS = (0x258, "<Q")
INIT_SIZE = (0x260, "<I")

# Standard magic numbers of the compressors the kernel build offers (CONFIG_KERNEL_*).
MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x5d\x00\x00", "lzma"),
    (b"BZh", "bzip2"),
    (b"\x89LZO", "lzo"),
    (b"\x7fELF", "uncompressed"),
)


def field(data: bytes, spec: tuple[int, str]) -> int:
    """A setup-header field of `data` (a bzImage or a zero page)."""
    value: int = struct.unpack_from(spec[1], data, spec[0])[0]
    return value


def is_bzimage(data: bytes) -> bool:
    return data[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + 4] == HEADER_MAGIC


@dataclass(frozen=True)
class BzImage:
    """A parsed bzImage: its setup header bytes (0x1F1 up to the header's end) and the
    protected-mode kernel (everything after the setup sectors)."""

    path: Path
    header: bytes
    kernel: bytes

    @classmethod
    def parse(cls, path: Path, data: bytes) -> "BzImage":
        """Raises BootError naming `path` when the header is missing, too old for the 64-bit
        entry, or says the kernel has no 64-bit entry point."""
        if len(data) < SECTOR + 0x70 or not is_bzimage(data):
            raise BootError(f"Linux kernel {path}: not a bzImage (no 'HdrS' setup header at 0x202)")
        version = field(data, VERSION)
        if version < MIN_VERSION:
            raise BootError(
                f"Linux kernel {path}: boot protocol {version >> 8}.{version & 0xFF:02d} is"
                " too old for the 64-bit entry (needs 2.12: xloadflags)"
            )
        if not field(data, XLOADFLAGS) & XLF_KERNEL_64:
            raise BootError(
                f"Linux kernel {path}: xloadflags lacks XLF_KERNEL_64 (not a 64-bit kernel)"
            )
        setup_sects = field(data, SETUP_SECTS) or 4
        kernel_start = (setup_sects + 1) * SECTOR
        if kernel_start >= len(data):
            raise BootError(f"Linux kernel {path}: truncated ({setup_sects} setup sectors)")
        header_end = HEADER_MAGIC_OFFSET + field(data, JUMP_END)
        if header_end < INIT_SIZE[0] + 4:
            raise BootError(
                f"Linux kernel {path}: setup header ends at {header_end:#x}, before init_size"
            )
        return cls(path, data[SETUP_HEADER_OFFSET:header_end], data[kernel_start:])

    def get(self, spec: tuple[int, str]) -> int:
        """A field of the setup header by its absolute offset (see the constants above)."""
        return field(self.header, (spec[0] - SETUP_HEADER_OFFSET, spec[1]))

    @property
    def cmdline_size(self) -> int:
        """Longest command line, without its terminating zero."""
        return self.get(CMDLINE_SIZE)

    @property
    def initrd_addr_max(self) -> int:
        return self.get(INITRD_ADDR_MAX)

    @property
    def load_address(self) -> int:
        """Where the protected-mode kernel goes: pref_address (2.10+), else 1 MiB."""
        return self.get(PREF_ADDRESS) or 0x10_0000

    @property
    def init_size(self) -> int:
        """Bytes from the load address the kernel needs before it can relocate itself."""
        return self.get(INIT_SIZE)

    def payload(self) -> bytes:
        """The uncompressed payload (an ELF vmlinux). Raises BootError naming the file and the
        compression when it is not one this VMM unpacks (gzip, xz)."""
        offset, length = self.get(PAYLOAD_OFFSET), self.get(PAYLOAD_LENGTH)
        if length == 0 or offset + length > len(self.kernel):
            raise BootError(
                f"Linux kernel {self.path}: payload_offset/payload_length ({offset:#x},"
                f" {length}) lie outside the protected-mode kernel"
            )
        return decompress(self.kernel[offset : offset + length], f"Linux kernel {self.path}")


def compression(data: bytes) -> str:
    """The compressor named by `data`'s magic number, or 'unknown'."""
    for magic, name in MAGICS:
        if data.startswith(magic):
            return name
    return "unknown"


def decompress(data: bytes, what: str) -> bytes:
    """`data` decompressed (gzip or xz; trailing bytes ignored), or as is if already ELF.
    Raises BootError starting with `what` for other formats or corrupt streams."""
    kind = compression(data)
    try:
        if kind == "gzip":
            return zlib.decompressobj(wbits=31).decompress(data)
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    except (zlib.error, lzma.LZMAError) as err:
        raise BootError(f"{what}: corrupt {kind} payload ({err})") from None
    if kind == "uncompressed":
        return data
    raise BootError(
        f"{what}: payload compressed with {kind}, which this VMM does not unpack (gzip and xz"
        " are supported; give an uncompressed vmlinux instead)"
    )
