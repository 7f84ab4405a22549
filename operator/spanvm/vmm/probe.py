"""Is KVM usable here? Open the device, check the API version, read the capabilities spanvm
uses, and create (then destroy) a VM: flags alone do not prove it works."""

import os
from dataclasses import dataclass, field

from spanvm.vmm import kvm_abi


@dataclass(frozen=True)
class KvmProbe:
    """The outcome of opening the KVM device and creating (then destroying) a VM."""

    usable: bool
    api_version: int | None = None
    error: str | None = None
    capabilities: dict[str, int] = field(default_factory=dict)


def probe_kvm(device: str = "/dev/kvm") -> KvmProbe:
    """Open the device, check the API version, create and destroy a VM."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return KvmProbe(False, error=f"cannot open {device}: {err.strerror}")
    try:
        version = kvm_abi.ioctl(fd, kvm_abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != kvm_abi.KVM_API_VERSION:
            return KvmProbe(
                False, version, f"KVM API {version}, expected {kvm_abi.KVM_API_VERSION}"
            )
        caps = {
            name: kvm_abi.ioctl(fd, kvm_abi.KVM_CHECK_EXTENSION, number, name)
            for name, number in kvm_abi.CAPABILITIES.items()
        }
        vm = kvm_abi.ioctl(fd, kvm_abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        os.close(vm)
        return KvmProbe(True, version, capabilities=caps)
    except kvm_abi.KvmError as err:
        return KvmProbe(False, error=str(err))
    finally:
        os.close(fd)
