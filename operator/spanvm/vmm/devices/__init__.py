"""Devices on the VMM's buses (see `bus.py`): each module one device, each registered in
`platform.py` by one line."""

from typing import Protocol

from spanvm.vmm.console import Console
from spanvm.vmm.memory import GuestMemory
from spanvm.vmm.vcpu import Vcpu


class DeviceHost(Protocol):
    """What a device may ask of the VM that holds it."""

    console: Console

    @property
    def guest_memory(self) -> GuestMemory: ...

    def guest_exit(self, vcpu: Vcpu, code: int) -> None: ...

    def fail(self, message: str) -> None: ...

    def describe(self, vcpu: Vcpu, what: str) -> str: ...

    def set_irq_line(self, irq: int, level: bool) -> None: ...
