"""VMFragment: one placed piece of a SpanningVM, run by the agent of its node."""

from datetime import datetime
from typing import Literal

from pydantic import Field

from spanvm.api.base import (
    CONDITIONS_LIST_EXTRA,
    QUANTITY_PATTERN,
    ApiModel,
    Condition,
    ObjectMeta,
    cel,
    validations,
)
from spanvm.api.phases import DesiredState, FragmentPhase
from spanvm.api.spanningvm import BootSpec, FabricSpec


def _fixed(field: str) -> dict[str, str]:
    return cel("self == oldSelf", f"{field} is fixed once the fragment is placed")


class MemoryRange(ApiModel):
    """A guest-physical range, in bytes."""

    start: int = Field(ge=0, description="First guest-physical byte of the range.")
    size: int = Field(
        ge=4096, description="Length of the range in bytes (a multiple of the page size)."
    )


class Peer(ApiModel):
    """Another fragment of the same VM, as this fragment's fabric reaches it."""

    index: int = Field(ge=0, le=63, description="The peer's fragment index.")
    node_name: str = Field(max_length=253, description="Node the peer runs on.")
    endpoint: str | None = Field(
        default=None,
        max_length=300,
        description="host:port of the peer's fabric listener, once known.",
    )
    home_memory: list[MemoryRange] = Field(
        default_factory=list,
        max_length=64,
        description="Guest-physical ranges the peer is home for (every fragment needs the map).",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )


class SecretRef(ApiModel):
    """A key of a Secret in the fragment's namespace."""

    name: str = Field(max_length=253, description="Secret name.")
    key: str = Field(default="fabric-key", max_length=253, description="Key in the Secret's data.")


class VMFragmentSpec(ApiModel):
    """What one fragment runs: its vCPUs, the memory it is home for, and its peers."""

    model_config = {
        "json_schema_extra": validations(
            cel(
                "self.vcpuIds.all(v, v < self.vcpuCount)",
                "every vcpuIds entry must be below vcpuCount",
                field_path=".vcpuIds",
            ),
            cel(
                "self.index < self.fragmentCount",
                "index must be below fragmentCount",
                field_path=".index",
            ),
        )
    }

    vm_name: str = Field(
        max_length=253,
        description="The SpanningVM this fragment belongs to.",
        json_schema_extra=validations(_fixed("vmName")),
    )
    index: int = Field(
        ge=0,
        le=63,
        description="Fragment number within the VM (0 holds vCPU 0 and reports for the VM).",
    )
    fragment_count: int = Field(ge=1, le=64, description="Number of fragments the VM has.")
    node_name: str = Field(
        max_length=253,
        description="Node whose agent runs this fragment.",
        json_schema_extra=validations(_fixed("nodeName")),
    )
    vcpu_ids: list[int] = Field(
        min_length=1,
        max_length=1024,
        description="Guest vCPU ids run by this fragment.",
        json_schema_extra={**validations(_fixed("vcpuIds")), "x-kubernetes-list-type": "atomic"},
    )
    vcpu_count: int = Field(ge=1, le=1024, description="vCPUs of the whole VM.")
    memory: str = Field(
        max_length=64,
        pattern=QUANTITY_PATTERN,
        description="Guest memory of the whole VM (quantity).",
    )
    home_memory: list[MemoryRange] = Field(
        default_factory=list,
        max_length=64,
        description="Guest-physical ranges this fragment is home for.",
        json_schema_extra={**validations(_fixed("homeMemory")), "x-kubernetes-list-type": "atomic"},
    )
    boot: BootSpec = Field(description="What the guest runs (copied from the SpanningVM).")
    fabric: FabricSpec = Field(
        default_factory=FabricSpec, description="Fabric settings (copied from the SpanningVM)."
    )
    peers: list[Peer] | None = Field(
        default=None,
        max_length=64,
        description="All fragments of the VM, filled once every one is placed.",
    )
    secret_ref: SecretRef | None = Field(default=None, description="The per-VM fabric secret.")
    desired_state: DesiredState = Field(
        default=DesiredState.RUNNING,
        description="Running; Paused to hold the fragment's vCPUs (the fabric keeps serving);"
        " Stopped to ask the agent to stop the fragment.",
    )


class FabricCounters(ApiModel):
    """Memory fabric counters of one fragment."""

    page_faults: int = Field(default=0, description="Guest page faults served by the fabric.")
    pages_in: int = Field(default=0, description="Pages received from peers.")
    pages_out: int = Field(default=0, description="Pages sent to peers.")
    invalidations: int = Field(default=0, description="Pages dropped on a peer's request.")


class VMFragmentStatus(ApiModel):
    """Observed state of a fragment, written by its node's agent."""

    phase: FragmentPhase | None = Field(default=None, description="Lifecycle phase.")
    endpoint: str | None = Field(
        default=None, description="host:port of this fragment's fabric listener."
    )
    pid: int | None = Field(default=None, description="Process id of the fragment VMM on its node.")
    started_at: datetime | None = Field(default=None, description="When the fragment VMM started.")
    exit_code: int | None = Field(
        default=None, description="Guest exit code (fragment 0) or VMM exit status."
    )
    message: str | None = Field(default=None, description="Why the fragment is in its phase.")
    console_tail: str | None = Field(
        default=None, description="Last lines of the guest console (fragment 0)."
    )
    console_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Bytes the guest has written to its console so far (fragment 0;"
        " consoleTail ends there).",
    )
    counters: FabricCounters | None = Field(default=None, description="Fabric counters.")
    conditions: list[Condition] | None = Field(
        default=None, description="Fragment conditions.", json_schema_extra=CONDITIONS_LIST_EXTRA
    )
    observed_generation: int | None = Field(
        default=None, description="Last metadata.generation acted on."
    )


class VMFragment(ApiModel):
    """One fragment of a SpanningVM: some vCPUs and a home share of guest memory on one node."""

    api_version: Literal["spanvm.io/v1alpha1"] = Field(
        default="spanvm.io/v1alpha1", description="API version."
    )
    kind: Literal["VMFragment"] = Field(default="VMFragment", description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: VMFragmentSpec = Field(description="Desired state.")
    status: VMFragmentStatus | None = Field(default=None, description="Observed state.")
