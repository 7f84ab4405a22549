"""spanvm's own ring-3 payloads: a flat image at IMAGE_BASE run at CPL3 on every vCPU at once,
with the system area of `layout.py` (GDT, TSS, IDT stubs, page tables, boot-info pages)."""

from spanvm.payloads.build import PayloadImage
from spanvm.vmm import kvm_abi, layout
from spanvm.vmm.boot import BootError, GuestShape, read_file
from spanvm.vmm.layout import GuestLayout
from spanvm.vmm.memmap import ram_ranges
from spanvm.vmm.memory import GuestMemory
from spanvm.vmm.vcpu import Vcpu


class PayloadBoot:
    """Run `image` with `arg` (in every vCPU's boot-info page)."""

    def __init__(self, image: PayloadImage, arg: int = 0) -> None:
        self.image = image
        self.arg = arg
        self.layout: GuestLayout | None = None
        self._bytes = b""
        self.loaded_end = image.load_address

    @property
    def description(self) -> str:
        return f"payload image {self.image.path}"

    @property
    def platform(self) -> bool:
        return False

    def check(self, shape: GuestShape) -> None:
        try:  # sizes first: never read what cannot fit
            image_size = self.image.path.stat().st_size
            self.layout = GuestLayout.plan(
                shape.memory_size,
                shape.vcpu_count,
                max(self.image.end, layout.IMAGE_BASE + image_size),
                ram_ranges(shape.memory_size),
                image_name=self.description,
            )
        except OSError as err:
            raise BootError(f"{self.description}: {err.strerror}") from None
        except layout.LayoutError as err:
            raise BootError(str(err)) from None
        self._bytes = read_file(self.image.path, "payload image")
        self.loaded_end = self.image.load_address + len(self._bytes)

    def load(self, memory: GuestMemory, shape: GuestShape) -> None:
        assert self.layout is not None, "check() first"
        memory.write(self.image.load_address, self._bytes)
        layout.write_system_area(memory, self.layout, self.arg)

    def setup_vcpu(self, vcpu: Vcpu, shape: GuestShape) -> None:
        assert self.layout is not None, "check() first"
        sregs = vcpu.sregs()
        layout.user_mode_sregs(
            sregs, self.layout.bootinfo_address(vcpu.id), vcpu.id, shape.vcpu_count
        )
        vcpu.set_sregs(sregs)
        vcpu.set_regs(layout.user_mode_regs(self.layout, vcpu.id, self.image.entry))
        # With the in-kernel irqchip, application processors wait for INIT/SIPI; start them.
        vcpu.set_mp_state(kvm_abi.KVM_MP_STATE_RUNNABLE)

    def symbolize(self, address: int) -> str:
        return self.image.symbolize(address)
