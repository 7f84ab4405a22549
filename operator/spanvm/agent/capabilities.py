"""What a node can do, found by trying rather than trusting flags (design section 9).

KVM counts as usable only if /dev/kvm opens, speaks API 12 and creates a VM; the CPU's
vmx/svm flags and the loaded KVM module ("flavour": intel, amd, pvm) are reported as they
are. Published on the Node in the style of Node Feature Discovery: labels a scheduler can
select on, an annotation with the details, and the vCPUs and memory offered to guests.
"""

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from spanvm.agent.libvirt_caps import SOCKET, LibvirtHost, host_capabilities
from spanvm.vmm.probe import KvmProbe, probe_kvm

LABEL_PREFIX = "spanvm.io/"
DETAILS_ANNOTATION = "spanvm.io/capabilities"
RESERVED_MEMORY = 1 << 30  # left to the host and the agent itself
MEMORY_UNIT = 2 << 20


@dataclass(frozen=True)
class NodeCapabilities:
    """Everything the agent publishes about its node."""

    kvm: KvmProbe
    flavour: str  # intel, amd, pvm or unknown: the KVM module actually loaded
    cpu_flags: tuple[str, ...]  # of interest: vmx, svm, hypervisor
    nested: bool | None  # the loaded module's `nested` parameter, if it has one
    cpus: int
    memory: int  # bytes of RAM
    hugepages_2mi: int
    rdma_devices: tuple[str, ...]
    libvirt: LibvirtHost

    @property
    def allocatable_vcpus(self) -> int:
        return self.cpus if self.kvm.usable else 0

    @property
    def allocatable_memory(self) -> int:
        """Guest memory offered: RAM less a reserve, in 2 MiB units; 0 without KVM."""
        if not self.kvm.usable:
            return 0
        return max(0, self.memory - RESERVED_MEMORY) // MEMORY_UNIT * MEMORY_UNIT

    def labels(self) -> dict[str, str]:
        """Node labels (all values valid label values)."""
        return {
            f"{LABEL_PREFIX}kvm": str(self.kvm.usable).lower(),
            f"{LABEL_PREFIX}kvm-flavour": self.flavour,
            f"{LABEL_PREFIX}cpu-vmx": str("vmx" in self.cpu_flags).lower(),
            f"{LABEL_PREFIX}cpu-svm": str("svm" in self.cpu_flags).lower(),
            f"{LABEL_PREFIX}nested": "unknown" if self.nested is None else str(self.nested).lower(),
            f"{LABEL_PREFIX}rdma": str(bool(self.rdma_devices)).lower(),
            f"{LABEL_PREFIX}hugepages-2Mi": str(self.hugepages_2mi),
            f"{LABEL_PREFIX}libvirt": str(self.libvirt.reachable).lower(),
        }

    def details(self) -> str:
        """The annotation: every finding, as JSON."""
        return json.dumps(asdict(self), sort_keys=True)


def _flavour(sys_module: Path) -> tuple[str, bool | None]:
    for name, flavour in (("kvm_pvm", "pvm"), ("kvm_intel", "intel"), ("kvm_amd", "amd")):
        module = sys_module / name
        if module.exists():
            nested = module / "parameters" / "nested"
            value = nested.read_text().strip() if nested.exists() else None
            return flavour, None if value is None else value in ("1", "Y", "y")
    return "unknown", None


def _meminfo(proc: Path) -> dict[str, int]:
    out = {}
    for line in (proc / "meminfo").read_text().splitlines():
        match = re.match(r"(\w+):\s+(\d+)( kB)?", line)
        if match:
            out[match[1]] = int(match[2]) * (1024 if match[3] else 1)
    return out


def discover(
    device: str = "/dev/kvm", root: Path = Path("/"), libvirt_socket: Path = SOCKET
) -> NodeCapabilities:
    """Probe this node (root lets tests point at another /proc and /sys)."""
    flavour, nested = _flavour(root / "sys" / "module")
    flags = set()
    for line in (root / "proc" / "cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    meminfo = _meminfo(root / "proc")
    infiniband = root / "sys" / "class" / "infiniband"
    rdma = tuple(sorted(p.name for p in infiniband.iterdir())) if infiniband.is_dir() else ()
    return NodeCapabilities(
        kvm=probe_kvm(device),
        flavour=flavour,
        cpu_flags=tuple(sorted(flags & {"vmx", "svm", "hypervisor"})),
        nested=nested,
        cpus=len(os.sched_getaffinity(0)),
        memory=meminfo.get("MemTotal", 0),
        hugepages_2mi=meminfo.get("HugePages_Total", 0)
        if meminfo.get("Hugepagesize") == MEMORY_UNIT
        else 0,
        rdma_devices=rdma,
        libvirt=host_capabilities(libvirt_socket),
    )
