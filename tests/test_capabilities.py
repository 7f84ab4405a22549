"""Node capability discovery: a real KVM probe, and findings turned into Node labels."""

import json
import re
from pathlib import Path

import pytest

from spanvm.agent.capabilities import DETAILS_ANNOTATION, discover
from spanvm.vmm.probe import probe_kvm

# Kubernetes: qualified label name, and a value of at most 63 characters.
LABEL_KEY = re.compile(r"^spanvm\.io/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def test_this_node_has_working_kvm() -> None:
    found = discover()
    labels = found.labels()
    assert labels["spanvm.io/kvm"] == "true"
    assert found.allocatable_vcpus >= 1 and found.allocatable_memory > 0
    assert found.allocatable_memory % (2 << 20) == 0
    for key, value in labels.items():
        assert LABEL_KEY.match(key) and LABEL_VALUE.match(value), (key, value)
    details = json.loads(found.details())
    assert details["kvm"]["capabilities"]["IRQCHIP"] == 1
    assert DETAILS_ANNOTATION.startswith("spanvm.io/")


def test_hidden_kvm_makes_the_node_unschedulable(tmp_path: Path) -> None:
    found = discover(str(tmp_path / "kvm"))
    assert found.labels()["spanvm.io/kvm"] == "false"
    assert found.kvm.error and "cannot open" in found.kvm.error
    assert found.allocatable_vcpus == 0 and found.allocatable_memory == 0


def test_a_device_that_is_not_kvm_is_refused() -> None:
    probe = probe_kvm("/dev/null")
    assert not probe.usable and probe.error and "KVM_GET_API_VERSION" in probe.error


@pytest.fixture
def intel_root(tmp_path: Path) -> Path:
    """A /proc and /sys as an Intel host with nesting, RDMA and huge pages would show them."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text("processor : 0\nflags : fpu vmx sse2 hypervisor\n")
    (tmp_path / "proc" / "meminfo").write_text(
        "MemTotal:       65536000 kB\nHugePages_Total:      512\nHugepagesize:       2048 kB\n"
    )
    params = tmp_path / "sys" / "module" / "kvm_intel" / "parameters"
    params.mkdir(parents=True)
    (params / "nested").write_text("Y\n")
    (tmp_path / "sys" / "class" / "infiniband" / "mlx5_0").mkdir(parents=True)
    return tmp_path


def test_findings_become_labels(intel_root: Path) -> None:
    labels = discover(root=intel_root).labels()
    assert labels["spanvm.io/kvm-flavour"] == "intel"
    assert labels["spanvm.io/cpu-vmx"] == "true" and labels["spanvm.io/cpu-svm"] == "false"
    assert labels["spanvm.io/nested"] == "true"
    assert labels["spanvm.io/rdma"] == "true"
    assert labels["spanvm.io/hugepages-2Mi"] == "512"


def test_libvirt_is_reported_with_the_reason_it_cannot_be_asked(tmp_path: Path) -> None:
    found = discover(libvirt_socket=tmp_path / "libvirt-sock")
    assert found.libvirt.reachable is False
    assert f"no libvirtd socket at {tmp_path / 'libvirt-sock'}" == found.libvirt.reason
    assert found.labels()["spanvm.io/libvirt"] == "false"
    assert json.loads(found.details())["libvirt"]["reason"] == found.libvirt.reason
