"""hack/linux-guest: Debian's kernel reaches its banner under spanvm; the initramfs it builds
is a well-formed newc archive."""

import re
import stat
import subprocess

import pytest

from spanvm.devcluster.initramfs import INIT_SCRIPT, busybox_initramfs
from spanvm.devcluster.paths import repo_root

TIMELINE_LINE = re.compile(r"^ *\d+\.\d\d  ")  # linux_guest.Timeline: f"{seconds:8.2f}  {line}"


def parse_newc(archive: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev), read back by the format's rules."""
    members, offset = {}, 0
    while True:
        assert archive[offset : offset + 6] == b"070701"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name_at = offset + 110
        name = archive[name_at : name_at + namesize - 1].decode()
        data_at = (name_at + namesize + 3) // 4 * 4
        if name == "TRAILER!!!":
            assert len(archive) == (data_at + 3) // 4 * 4
            return members
        members[name] = (mode, archive[data_at : data_at + size], rdev)
        offset = (data_at + size + 3) // 4 * 4


def test_initramfs_holds_busybox_init_and_console() -> None:
    members = parse_newc(busybox_initramfs(b"\x7fELF-busybox", ("sh", "mount")))
    assert members["bin/busybox"] == (stat.S_IFREG | 0o755, b"\x7fELF-busybox", (0, 0))
    assert members["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox", (0, 0))
    assert members["init"][1] == INIT_SCRIPT and members["init"][0] & 0o111
    assert members["dev/console"] == (stat.S_IFCHR | 0o600, b"", (5, 1))
    assert {"bin", "dev", "proc", "sys"} <= members.keys()


@pytest.mark.kvm
@pytest.mark.slow
def test_debian_kernel_reaches_its_banner() -> None:
    """Stops the VM at the command-line line, which the kernel prints right after its banner
    (about a minute of emulated early boot here). Only the timeline's lines (seconds, two
    spaces, console text) are counted: the summary repeats the last console line."""
    result = subprocess.run(
        [str(repo_root() / "hack" / "linux-guest"), "--until", "Command line: ", "--limit", "400"],
        capture_output=True,
        text=True,
        check=False,
        timeout=540,  # below pytest's own 600 s, above --limit 400
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    console = [
        TIMELINE_LINE.sub("", line)
        for line in result.stdout.splitlines()
        if TIMELINE_LINE.match(line)
    ]
    banners = [line for line in console if "Linux version 6.1." in line]
    assert len(banners) == 1 and "(debian-kernel@lists.debian.org)" in banners[0]
    command_lines = [line for line in console if "Command line: " in line]
    assert command_lines, result.stdout[-3000:]
    assert "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr" in command_lines[0]
    assert console.index(banners[0]) < console.index(command_lines[0])
    assert "stopped after " in result.stdout and ": reached /Command line: /" in result.stdout
