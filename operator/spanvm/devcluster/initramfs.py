"""A tiny busybox initramfs: a cpio archive in the "newc" format the kernel unpacks at boot.

Source: Linux Documentation/driver-api/early-userspace/buffer-format.rst (the newc header:
magic "070701" and thirteen 8-digit hex fields; name and data each padded to 4 bytes; the
archive ends with the entry "TRAILER!!!"). Left uncompressed: here the guest kernel mode is
emulated, and unpacking a compressed archive would cost minutes.
"""

import stat
from dataclasses import dataclass

INIT_SCRIPT = b"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
echo "spanvm: busybox init reached user space"
/bin/busybox uname -a
/bin/busybox poweroff -f
"""


@dataclass(frozen=True)
class Entry:
    """One archive member: `name` without a leading slash, its mode (type and permission
    bits), its data (a symlink's target for links) and rdev for device nodes."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def newc(entries: list[Entry]) -> bytes:
    """The entries as a newc cpio archive, trailer included."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (
            ino,
            entry.mode,
            0,  # uid
            0,  # gid
            1,  # nlink
            0,  # mtime
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        out += _pad4(b"070701" + b"".join(b"%08x" % f for f in fields) + name)
        out += _pad4(entry.data)
    return bytes(out)


def busybox_initramfs(busybox: bytes, applets: tuple[str, ...] = ("sh",)) -> bytes:
    """An archive with /bin/busybox (a static binary), applet links, /dev/console, /proc,
    /sys and an /init script that reports user space and powers off."""
    directory, executable = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    entries = [Entry(d, directory) for d in ("bin", "dev", "proc", "sys")]
    entries.append(Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(Entry("bin/busybox", executable, busybox))
    entries += [Entry(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox") for a in applets]
    entries.append(Entry("init", executable, INIT_SCRIPT))
    return newc(entries)
