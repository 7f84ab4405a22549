"""SpanningVM: the user-facing object asking for one guest spread over several nodes."""

from datetime import datetime
from typing import Literal

from pydantic import Field, field_validator, model_validator

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
from spanvm.api.phases import FragmentPhase, PrintableStatus, RunStrategy, VMPhase
from spanvm.api.quantity import (
    MAX_GUEST_MEMORY,
    MIN_GUEST_MEMORY,
    format_memory,
    memory_cel_rules,
    parse_memory,
)
from spanvm.payloads.catalog import (
    MAX_ARG,
    MAX_IMAGE_SIZE,
    PAYLOAD_NAMES,
    PAYLOADS,
    PayloadInfo,
)
from spanvm.vmm.layout import IMAGE_BASE, MAX_VCPUS, STACK_SIZE
from spanvm.vmm.memmap import LARGE_PAGE, LOW_RAM_LIMIT

# What the fragment VMM and the fabric cannot do yet: refused at admission, not deep inside.
LINUX_ONE_NODE = (
    "boot.linux runs on one node until logical-destination IPIs cross fragments:"
    " set placement.maxFragments: 1"
)
RDMA_UNSUPPORTED = "fabric.transport rdma is not supported yet: use auto or tcp"
# KubeVirt's run strategies, with KubeVirt's meanings (docs/cli.md, kubectl explain).
RUN_STRATEGY_MEANINGS: dict[RunStrategy, str] = {
    RunStrategy.ALWAYS: "the guest always runs: restarted after any exit, failure or success,"
    " and rescheduled on node loss",
    RunStrategy.RERUN_ON_FAILURE: "restarted after a failure (a non-zero exit, a lost fragment"
    " or node), not after a clean exit (code 0)",
    RunStrategy.ONCE: "runs once to completion and is never restarted",
    RunStrategy.MANUAL: "runs and stops only when asked (spanvm start/stop/restart); never"
    " restarted by the operator",
    RunStrategy.HALTED: "does not run; a running guest is stopped",
}


class CpuSpec(ApiModel):
    """The guest's processors."""

    model_config = {"json_schema_extra": validations(immutable("spec.cpu"))}

    vcpus: int = Field(
        ge=1,
        le=MAX_VCPUS,
        description=(
            "Number of virtual CPUs the guest sees; they are spread over the fragments"
            f" (at most {MAX_VCPUS}, the VMM's limit)."
        ),
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
        le=MAX_ARG,
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
        min_length=1,
        max_length=4096,
        description="Path of the kernel (vmlinux ELF or bzImage) on the node.",
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
    linux: LinuxBoot | None = Field(
        default=None,
        description="A Linux kernel (vmlinux or bzImage) and initrd, by path on the node,"
        " booted through the Linux 64-bit boot protocol (one node: placement.maxFragments 1).",
    )

    @model_validator(mode="after")
    def _one_supported_source(self) -> "BootSpec":
        if (self.payload is None) == (self.linux is None):
            raise ValueError("exactly one of boot.payload or boot.linux must be set")
        return self


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

    model_config = {
        "json_schema_extra": validations(
            cel("self.transport != 'rdma'", RDMA_UNSUPPORTED, field_path=".transport")
        )
    }

    transport: Literal["auto", "tcp", "rdma"] = Field(
        default="auto",
        description=(
            "auto (TCP today; RDMA once the fabric has it), tcp, or rdma"
            " (not supported yet: refused)."
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

    @field_validator("transport")
    @classmethod
    def _supported_transport(cls, value: str) -> str:
        if value == "rdma":
            raise ValueError(RDMA_UNSUPPORTED)
        return value


def heap_start(vcpus: int) -> int:
    """Where the guest heap starts at the latest: after the largest payload image and one
    stack per vCPU, rounded up to 2 MiB (as GuestLayout.plan places it)."""
    end = IMAGE_BASE + MAX_IMAGE_SIZE + vcpus * STACK_SIZE
    return (end + LARGE_PAGE - 1) // LARGE_PAGE * LARGE_PAGE


def heap_need(payload: PayloadInfo, arg: int | None, vcpus: int) -> int:
    """Bytes of guest memory the payload needs below the 3 GiB hole for its argument."""
    return heap_start(vcpus) + payload.arg_bytes * (payload.default_arg if arg is None else arg)


def _heap_need_cel(p: PayloadInfo) -> str:
    """heap_need() in CEL, over self (the spec)."""
    start = (
        f"((self.cpu.vcpus * {STACK_SIZE} + {IMAGE_BASE + MAX_IMAGE_SIZE + LARGE_PAGE - 1})"
        f" / {LARGE_PAGE} * {LARGE_PAGE})"
    )
    arg = f"(has(self.boot.payload.arg) ? self.boot.payload.arg : {p.default_arg})"
    return f"({start} + {p.arg_bytes} * {arg})"


def _heap_message(p: PayloadInfo) -> str:
    return (
        f"payload {p.name} needs {p.arg_bytes} bytes of guest memory below 3Gi per unit of"
        " boot.payload.arg, after the payload image and 64Ki of stack per vCPU: raise memory"
        " or lower arg"
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
                "!has(self.boot.linux) || (has(self.placement)"
                " && has(self.placement.maxFragments) && self.placement.maxFragments == 1)",
                LINUX_ONE_NODE,
                field_path=".boot.linux",
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
            *(
                cel(
                    f"!has(self.boot.payload) || self.boot.payload.name != '{p.name}'"
                    " || !isQuantity(self.memory)"
                    f" || quantity(self.memory).compareTo(quantity('{MIN_GUEST_MEMORY}')) < 0"
                    f" || quantity(self.memory).compareTo(quantity('{MAX_GUEST_MEMORY}')) > 0 || ("
                    + _heap_need_cel(p)
                    + f" <= {LOW_RAM_LIMIT} && quantity(self.memory).sub("
                    + _heap_need_cel(p)
                    + ").compareTo(quantity('0')) >= 0)",
                    _heap_message(p),
                    field_path=".memory",
                )
                for p in PAYLOADS.values()
                if p.arg_bytes
            ),
        )
    }

    cpu: CpuSpec = Field(description="The guest's virtual CPUs.")
    memory: str = Field(
        max_length=64,
        pattern=QUANTITY_PATTERN,
        description=(
            f"Guest memory as a quantity (e.g. 512Mi, 0.5Gi, 8Gi): at least {MIN_GUEST_MEMORY},"
            f" at most {MAX_GUEST_MEMORY}, a whole multiple of 2Mi."
        ),
        json_schema_extra=validations(
            *(cel(rule, message) for rule, message in memory_cel_rules()),
            immutable("spec.memory"),
        ),
    )
    boot: BootSpec = Field(description="What the guest runs.")

    @field_validator("memory")
    @classmethod
    def _memory_quantity(cls, value: str) -> str:
        parse_memory(value)
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "SpanningVMSpec":
        """The CEL rules above, in Python: the model refuses what the API server refuses."""
        placement = self.placement
        if placement and placement.max_fragments and placement.max_fragments > self.cpu.vcpus:
            raise ValueError(
                "placement.maxFragments must not exceed cpu.vcpus: every fragment runs at least"
                " one vCPU"
            )
        if placement and placement.min_vcpus_per_fragment > self.cpu.vcpus:
            raise ValueError("placement.minVcpusPerFragment must not exceed cpu.vcpus")
        if self.boot.linux is not None and (placement is None or placement.max_fragments != 1):
            raise ValueError(LINUX_ONE_NODE)
        payload = self.boot.payload
        if payload is None:
            return self
        info = PAYLOADS[payload.name]
        if self.cpu.vcpus < info.min_vcpus:
            raise ValueError(f"payload {info.name} needs cpu.vcpus >= {info.min_vcpus}")
        need = heap_need(info, payload.arg, self.cpu.vcpus)
        if info.arg_bytes and (need > LOW_RAM_LIMIT or need > parse_memory(self.memory)):
            raise ValueError(f"{_heap_message(info)} (needs {format_memory(need)} or more)")
        return self

    placement: PlacementSpec | None = Field(
        default=None, description="How the guest may be split over nodes."
    )
    fabric: FabricSpec | None = Field(default=None, description="Memory fabric settings.")
    run_strategy: RunStrategy = Field(
        default=RunStrategy.ONCE,
        description="When the guest runs, as in KubeVirt: "
        + "; ".join(f"{k}: {v}" for k, v in RUN_STRATEGY_MEANINGS.items())
        + ". `spanvm start` and `spanvm stop` switch Halted to Always and back.",
    )


class FragmentSummary(ApiModel):
    """One placed fragment as seen from the SpanningVM."""

    name: str = Field(description="Name of the VMFragment object.")
    node_name: str = Field(description="Node running the fragment.")
    vcpu_ids: list[int] = Field(description="Guest vCPU ids this fragment runs.")
    memory: str = Field(description="Guest memory this fragment is home for (quantity).")
    phase: FragmentPhase | None = Field(default=None, description="The fragment's phase.")


class StartFailure(ApiModel):
    """Failures in a row and the back-off before the next restart (KubeVirt's
    status.startFailure)."""

    consecutive_fail_count: int = Field(
        ge=0, description="Runs in a row that ended in failure (reset by an exit 0 or a verb)."
    )
    retry_after_timestamp: datetime | None = Field(
        default=None,
        description="When the next restart may happen; set while in CrashLoopBackOff.",
    )


class SpanningVMStatus(ApiModel):
    """Observed state of a SpanningVM, written by the operator."""

    phase: VMPhase | None = Field(default=None, description="Lifecycle phase.")
    printable_status: PrintableStatus | None = Field(
        default=None,
        description="The state in one word for people, as KubeVirt's printableStatus:"
        " Stopped, Provisioning (being placed), Starting, Running, Paused, Stopping,"
        " Terminating, Succeeded, Failed, Degraded (a node is lost), ErrorUnschedulable,"
        " CrashLoopBackOff (restarts failing, waiting before the next).",
    )
    conditions: list[Condition] | None = Field(
        default=None,
        description="Scheduled, FabricReady and Ready, each with a CamelCase reason"
        " and a message saying why.",
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
    console_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Bytes the guest has written to its console so far (consoleTail ends there).",
    )
    message: str | None = Field(default=None, description="Human-readable summary of the state.")
    restarts: int | None = Field(
        default=None,
        description="Times the guest was restarted (by its runStrategy or `spanvm restart`).",
    )
    start_failure: StartFailure | None = Field(
        default=None, description="Failures in a row and the back-off before the next restart."
    )
    last_request: str | None = Field(
        default=None,
        description="The last spanvm.io/request annotation (start, stop, restart) acted on.",
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
