"""libvirt's view of the host, when a libvirtd socket is reachable (design section 10).

Optional: libvirt-python is imported only if installed, and only when the socket exists, so
nodes without libvirt pay nothing. The finding says which of these held.
"""

import importlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOCKET = Path("/var/run/libvirt/libvirt-sock")


@dataclass(frozen=True)
class LibvirtHost:
    """What libvirt says (or why it could not be asked)."""

    reachable: bool
    reason: str = ""
    arch: str = ""
    cpu_model: str = ""
    domain_types: tuple[str, ...] = ()


def host_capabilities(socket: Path = SOCKET, uri: str = "qemu:///system") -> LibvirtHost:
    """Ask libvirtd for its host capabilities, read-only."""
    if not socket.exists():
        return LibvirtHost(False, f"no libvirtd socket at {socket}")
    try:
        libvirt: Any = importlib.import_module("libvirt")
    except ImportError:
        return LibvirtHost(False, "libvirt-python is not installed")
    try:
        conn = libvirt.openReadOnly(uri)
        try:
            caps = ET.fromstring(conn.getCapabilities())
        finally:
            conn.close()
    except Exception as err:
        return LibvirtHost(False, f"libvirtd at {uri}: {err}")
    return LibvirtHost(
        True,
        arch=caps.findtext("host/cpu/arch", ""),
        cpu_model=caps.findtext("host/cpu/model", ""),
        domain_types=tuple(
            sorted({d.get("type", "") for d in caps.findall("guest/arch/domain")} - {""})
        ),
    )
