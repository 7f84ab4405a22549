"""SpanningVM: the user-facing object asking for one guest spread over several nodes."""

from typing import Literal

from pydantic import Field, field_validator

from spanvm.api.base import (
    CONDITIONS_LIST_EXTRA,
    QUANTITY_PATTERN,
    ApiModel,
    Condition,
    ObjectMeta,
    cel,
    immutable,
    validations,
)
from spanvm.api.quantity import (
    MEMORY_ALIGNMENT,
    MIN_GUEST_MEMORY_BYTES,
    format_memory,
    parse_memory,
)
from spanvm.payloads.catalog import PAYLOAD_NAMES, PAYLOADS

MIN_GUEST_MEMORY = format_memory(MIN_GUEST_MEMORY_BYTES)

Phase = Literal[
    "Pending",
    "Scheduling",
    "Starting",
    "Running",
    "Degraded",
    "Succeeded",
    "Failed",
    "Terminating",
    "Stopped",
]
RunStrategy = Literal["Always", "Once", "Halted"]


class CpuSpec(ApiModel):
    """The guest's processors."""

    model_config = {"json_schema_extra": validations(immutable("spec.cpu"))}

    vcpus: int = Field(
        ge=1,
        le=1024,
        description="Number of virtual CPUs the guest sees; they are spread over the fragments.",
    )


class PayloadBoot(ApiModel):
    """Boot one of spanvm's built-in test payloads (freestanding programs run in user mode)."""

    name: str = Field(
        max_length=64,
        description="Payload name: "
        + ", ".join(f"{p.name} ({p.description})" for p in PAYLOADS.values()),
        json_schema_extra={"enum": list(PAYLOAD_NAMES)},
    )
    arg: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Payload argument (iterations, rounds, array size; see name)."
            " Unset: the payload's default."
        ),
    )

    @field_validator("name")
    @classmethod
    def _known_payload(cls, value: str) -> str:
        if value not in PAYLOADS:
            raise ValueError(f"unknown payload {value!r}; known: {', '.join(PAYLOAD_NAMES)}")
        return value


class LinuxBoot(ApiModel):
    """Boot a Linux kernel with the Linux boot protocol (paths on the node)."""

    kernel: str = Field(
        min_length=1, max_length=4096, description="Path of the bzImage on the node."
    )
    initrd: str | None = Field(
        default=None, max_length=4096, description="Path of the initial ramdisk on the node."
    )
    cmdline: str = Field(
        default="console=ttyS0", max_length=4096, description="Kernel command line."
    )


class BootSpec(ApiModel):
    """What the guest runs: exactly one of payload or linux."""

    model_config = {
        "json_schema_extra": validations(
            cel(
                "has(self.payload) != has(self.linux)",
                "exactly one of boot.payload or boot.linux must be set",
            ),
            immutable("spec.boot"),
        )
    }

    payload: PayloadBoot | None = Field(default=None, description="A built-in test payload.")
    linux: LinuxBoot | None = Field(default=None, description="A Linux kernel and initrd.")


class Toleration(ApiModel):
    """A toleration of a node taint, as in a Pod spec."""

    key: str | None = Field(
        default=None,
        max_length=317,
        description="Taint key to tolerate; empty with Exists tolerates all.",
    )
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(
        default=None, max_length=63, description="Taint value to match with Equal."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )


class PlacementSpec(ApiModel):
    """How the guest may be split over nodes."""

    max_fragments: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=(
            "Most fragments (nodes) the guest may be split into; unset: up to one per vCPU."
        ),
    )
    min_vcpus_per_fragment: int = Field(
        default=1, ge=1, le=1024, description="Fewest vCPUs any one fragment may hold."
    )
    node_selector: dict[str, str] | None = Field(
        default=None, description="Labels a node must carry to receive a fragment."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, description="Taints the fragments tolerate."
    )


class FabricSpec(ApiModel):
    """The memory fabric that keeps guest memory coherent between fragments."""

    transport: Literal["auto", "tcp", "rdma"] = Field(
        default="auto",
        description=(
            "auto (RDMA where every node has it, else TCP), tcp, or rdma"
            " (fails where a node has none)."
        ),
    )
    page_size: Literal[4096] = Field(
        default=4096, description="Coherence granularity in bytes (4096 today)."
    )
    home_policy: Literal["proportional", "first"] = Field(
        default="proportional",
        description=(
            "Which fragment is home for each guest page: proportional (contiguous shares sized "
            "by vCPUs) or first (fragment 0 homes all, as in GiantVM)."
        ),
    )


class SpanningVMSpec(ApiModel):
    """Desired state of a SpanningVM."""

    model_config = {
        "json_schema_extra": validations(
            cel(
                "!has(self.placement) || !has(self.placement.maxFragments)"
                " || self.placement.maxFragments <= self.cpu.vcpus",
                "placement.maxFragments must not exceed cpu.vcpus:"
                " every fragment runs at least one vCPU",
                field_path=".placement.maxFragments",
            ),
            cel(
                "!has(self.placement) || self.placement.minVcpusPerFragment <= self.cpu.vcpus",
                "placement.minVcpusPerFragment must not exceed cpu.vcpus",
                field_path=".placement.minVcpusPerFragment",
            ),
            *(
                cel(
                    f"!has(self.boot.payload) || self.boot.payload.name != '{p.name}'"
                    f" || self.cpu.vcpus >= {p.min_vcpus}",
                    f"payload {p.name} needs cpu.vcpus >= {p.min_vcpus}",
                    field_path=".cpu.vcpus",
                )
                for p in PAYLOADS.values()
                if p.min_vcpus > 1
            ),
        )
    }

    cpu: CpuSpec = Field(description="The guest's virtual CPUs.")
    memory: str = Field(
        max_length=64,
        pattern=QUANTITY_PATTERN,
        description=f"Guest memory as a quantity (e.g. 512Mi, 8Gi); at least {MIN_GUEST_MEMORY}.",
        json_schema_extra=validations(
            cel("isQuantity(self)", "memory must be a quantity such as 256Mi or 8Gi"),
            cel(
                "!isQuantity(self)"
                f" || quantity(self).compareTo(quantity('{MIN_GUEST_MEMORY}')) >= 0",
                f"memory must be at least {MIN_GUEST_MEMORY}",
            ),
            cel(
                "!isQuantity(self) || (quantity(self).isInteger()"
                f" && quantity(self).asInteger() % {MEMORY_ALIGNMENT} == 0)",
                "memory must be a whole multiple of 2Mi (guest memory is mapped in 2 MiB pages)",
            ),
            immutable("spec.memory"),
        ),
    )
    boot: BootSpec = Field(description="What the guest runs.")

    @field_validator("memory")
    @classmethod
    def _memory_quantity(cls, value: str) -> str:
        parse_memory(value)
        return value

    placement: PlacementSpec | None = Field(
        default=None, description="How the guest may be split over nodes."
    )
    fabric: FabricSpec | None = Field(default=None, description="Memory fabric settings.")
    run_strategy: RunStrategy = Field(
        default="Once",
        description=(
            "Always (restart, reschedule on node loss), Once (run to completion),"
            " Halted (do not run)."
        ),
    )


class FragmentSummary(ApiModel):
    """One placed fragment as seen from the SpanningVM."""

    name: str = Field(description="Name of the VMFragment object.")
    node_name: str = Field(description="Node running the fragment.")
    vcpu_ids: list[int] = Field(description="Guest vCPU ids this fragment runs.")
    memory: str = Field(description="Guest memory this fragment is home for (quantity).")
    phase: str | None = Field(default=None, description="The fragment's phase.")


class SpanningVMStatus(ApiModel):
    """Observed state of a SpanningVM, written by the operator."""

    phase: Phase | None = Field(default=None, description="Lifecycle phase.")
    conditions: list[Condition] | None = Field(
        default=None,
        description="Scheduled, FabricReady and Ready, each with reason and message.",
        json_schema_extra=CONDITIONS_LIST_EXTRA,
    )
    observed_generation: int | None = Field(
        default=None, description="Last metadata.generation acted on."
    )
    fragments: list[FragmentSummary] | None = Field(
        default=None, description="Where the guest runs."
    )
    fragment_count: int | None = Field(default=None, description="Number of fragments placed.")
    nodes: str | None = Field(default=None, description="Comma-separated nodes running fragments.")
    exit_code: int | None = Field(default=None, description="Guest exit code once it finished.")
    console_tail: str | None = Field(default=None, description="Last lines of the guest console.")
    message: str | None = Field(default=None, description="Human-readable summary of the state.")
    restarts: int | None = Field(
        default=None, description="Times the operator restarted the guest (runStrategy Always)."
    )


class SpanningVM(ApiModel):
    """A virtual machine whose vCPUs and memory span several nodes."""

    api_version: Literal["spanvm.io/v1alpha1"] = Field(
        default="spanvm.io/v1alpha1", description="API version."
    )
    kind: Literal["SpanningVM"] = Field(default="SpanningVM", description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: SpanningVMSpec = Field(description="Desired state.")
    status: SpanningVMStatus | None = Field(default=None, description="Observed state.")
