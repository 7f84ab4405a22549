"""The contract between whoever starts a fragment (the node agent, `spanvm run --fragments`)
and the fragment process: what it is handed, how it is started, and what it reports back.

One place for all three, versioned: a fragment handed a configuration of another
CONTRACT_VERSION refuses it naming both versions (an agent and a fragment binary from
different releases never half-understand each other).

- `FragmentConfig`: the configuration, JSON on the fragment's standard input (it carries the
  VM's secret: never a command line or a file), built by `fragment_config` alone;
- `fragment_command`: the one command line that starts a fragment;
- `FragmentEvent`: what the fragment reports, one JSON line per event on `--status-fd`,
  written by `EventWriter` and read by `parse_event`/`parse_events`.

Pure: no KVM, no fabric, no API server.
"""

import json
import signal
import sys
from collections.abc import Callable, Iterable
from typing import IO, Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

# 2: a Linux kernel as the boot source (`linux`); 3: a Multiboot kernel (`multiboot`) and
# which fragment runs each vCPU (`vcpu_fragments`, where interrupts go), CPUID features (`cpu`)
CONTRACT_VERSION = 3
E = TypeVar("E")


class ContractError(ValueError):
    """A configuration or event that does not follow this contract (another version, a
    malformed document): the message says what and, for a version, both numbers."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinuxKernel(_Model):
    """A Linux kernel to boot instead of a payload: paths on the node, the command line."""

    kernel: str = Field(min_length=1, description="vmlinux ELF or bzImage path.")
    initrd: str | None = Field(default=None, description="Initial ramdisk path.")
    cmdline: str = Field(default="", description="Kernel command line.")


class MultibootKernel(_Model):
    """A Multiboot kernel (kvm-unit-tests, say) to boot instead of a payload."""

    kernel: str = Field(min_length=1, description="Multiboot kernel path (ELF or a.out kludge).")
    modules: list[str] = Field(default_factory=list, description="Module paths, in order.")
    cmdline: str = Field(default="", description="Kernel command line.")


class CpuFeatures(_Model):
    """CPUID features the guest sees: False hides one. The fields are vmm/cpuid.CpuidOptions'
    (each side builds the other from them by name)."""

    cx16: bool = Field(default=True, description="CMPXCHG16B (leaf 1 ECX[13]).")
    x2apic: bool = Field(default=True, description="x2APIC (leaf 1 ECX[21]).")


class FragmentConfig(_Model):
    """Everything one fragment process needs."""

    version: int = Field(
        default=CONTRACT_VERSION, description="Contract version the sender speaks."
    )
    index: int = Field(ge=0, description="This fragment's index; 0 reports for the VM.")
    fragment_count: int = Field(ge=1, description="Fragments in the VM.")
    vcpu_count: int = Field(ge=1, description="vCPUs of the whole VM.")
    vcpu_ids: list[int] = Field(min_length=1, description="vCPUs this fragment runs.")
    memory: int = Field(gt=0, description="Guest memory in bytes.")
    payload: str = Field(description="Built-in payload name, or a flat binary's path.")
    linux: LinuxKernel | None = Field(
        default=None, description="Boot this Linux kernel instead of the payload."
    )
    multiboot: MultibootKernel | None = Field(
        default=None, description="Boot this Multiboot kernel instead of the payload."
    )
    cpu: CpuFeatures = Field(default_factory=CpuFeatures, description="CPUID features shown.")
    vcpu_fragments: list[int] | None = Field(
        default=None,
        description="The fragment running each vCPU (index: vCPU id); unset: an interrupt for"
        " a vCPU not run here goes to every peer and the one running it takes it.",
    )
    arg: int = Field(default=0, ge=0, description="Payload argument.")
    homes: list[tuple[int, int, int]] = Field(description="(start, end, fragment) home ranges.")
    listen_host: str = Field(default="127.0.0.1", description="Fabric listener address.")
    peers: dict[int, str] = Field(
        default_factory=dict, description="Endpoints of lower-index fragments."
    )
    secret: str = Field(min_length=32, description="Hex per-VM fabric secret.")
    idle_timeout: float | None = Field(default=None, description="Fragment 0: stop a silent guest.")
    node_name: str = Field(default="local", description="Where this fragment runs, for messages.")
    readahead: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Pages a missing-page fault asks for (unset: the fabric's default).",
    )
    vcpu_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Nice value of vCPU threads: fault service (nice 0) preempts them.",
    )

    @model_validator(mode="after")
    def _one_kernel(self) -> "FragmentConfig":
        if self.linux is not None and self.multiboot is not None:
            raise ValueError("linux and multiboot: give at most one kernel")
        places = self.vcpu_fragments
        if places is not None:
            if len(places) != self.vcpu_count:
                raise ValueError(
                    f"vcpu_fragments: {len(places)} entries for {self.vcpu_count} vCPUs"
                )
            mine = [v for v, f in enumerate(places) if f == self.index]
            if mine != sorted(self.vcpu_ids) or any(
                not 0 <= f < self.fragment_count for f in places
            ):
                raise ValueError(
                    f"vcpu_fragments {places} disagree with vcpu_ids {self.vcpu_ids} of fragment"
                    f" {self.index} of {self.fragment_count}"
                )
        return self

    def to_json(self) -> bytes:
        """What goes on the fragment's standard input."""
        return self.model_dump_json().encode()


def fragment_config(
    *,
    index: int,
    vcpu_ids: list[int],
    vcpu_count: int,
    fragment_count: int,
    memory: int,
    payload: str,
    arg: int,
    homes: Iterable[tuple[int, int, int]],
    peers: dict[int, str],
    secret: str,
    listen_host: str,
    node_name: str,
    idle_timeout: float | None = None,
    readahead: int | None = None,
    linux: LinuxKernel | None = None,
    multiboot: MultibootKernel | None = None,
    vcpu_fragments: list[int] | None = None,
    cpu: CpuFeatures | None = None,
) -> FragmentConfig:
    """The one builder of a fragment's configuration (the agent's and the local launcher's).
    Only lower-index peers are kept (a fragment connects to the ones before it); idle_timeout
    goes to fragment 0 alone (it reports for the VM)."""
    return FragmentConfig(
        index=index,
        fragment_count=fragment_count,
        vcpu_count=vcpu_count,
        vcpu_ids=vcpu_ids,
        memory=memory,
        payload=payload,
        linux=linux,
        multiboot=multiboot,
        vcpu_fragments=vcpu_fragments,
        cpu=cpu or CpuFeatures(),
        arg=arg,
        homes=sorted(homes),
        listen_host=listen_host,
        peers={i: e for i, e in peers.items() if i < index},
        secret=secret,
        idle_timeout=idle_timeout if index == 0 else None,
        node_name=node_name,
        readahead=readahead,
    )


def read_config(data: str | bytes) -> FragmentConfig:
    """A configuration as a fragment receives it; another version is refused by name."""
    try:
        raw = json.loads(data)
    except ValueError as err:
        raise ContractError(f"the fragment configuration is not JSON: {err}") from None
    version = raw.get("version") if isinstance(raw, dict) else None
    if version != CONTRACT_VERSION:
        raise ContractError(
            f"this fragment speaks contract version {CONTRACT_VERSION} but was handed a"
            f" configuration of version {version}: the agent (or launcher) and the fragment"
            " come from different spanvm releases"
        )
    try:
        return FragmentConfig.model_validate(raw)
    except ValidationError as err:
        raise ContractError(f"invalid fragment configuration: {err}") from None


def fragment_command(status_fd: int, parent_pid: int | None = None) -> list[str]:
    """The command line of a fragment process (its configuration goes on standard input)."""
    command = [sys.executable, "-m", "spanvm.cli", "fragment", "--status-fd", str(status_fd)]
    if parent_pid is not None:
        command += ["--parent-pid", str(parent_pid)]
    return command


# -- signals ---------------------------------------------------------------------------------
# Besides SIGTERM/SIGINT/SIGHUP (stop), a fragment takes two real-time signals (queued, and
# each says what it means): PAUSE_SIGNAL holds its vCPUs outside the guest, RESUME_SIGNAL
# lets them run again; it answers with a Paused or Resumed event.
PAUSE_SIGNAL = signal.SIGRTMIN
RESUME_SIGNAL = signal.SIGRTMIN + 1  # an int: Signals names only SIGRTMIN and SIGRTMAX


def pause_signal(paused: bool) -> int:
    """The signal that asks a fragment to pause (True) or resume (False)."""
    return PAUSE_SIGNAL if paused else RESUME_SIGNAL


# -- events ----------------------------------------------------------------------------------
class Listening(_Model):
    """The fabric listener is up: peers may connect to `endpoint`."""

    event: Literal["listening"] = "listening"
    index: int
    endpoint: str


class Connected(_Model):
    """Every peer is connected: the guest runs."""

    event: Literal["connected"] = "connected"
    index: int


class Counters(_Model):
    """The fabric's counters when the fragment ended."""

    page_faults: int = 0
    pages_in: int = 0
    pages_out: int = 0
    invalidations: int = 0
    remote_faults: int = 0


class FaultHistogram(_Model):
    """Remote fault service times as a cumulative histogram (bound in seconds, count)."""

    buckets: list[tuple[float, int]] = Field(default_factory=list)
    seconds_sum: float = 0.0
    samples: int = 0


class Finished(_Model):
    """The guest ended here: its exit code or error, counters, fault latencies, marks."""

    event: Literal["finished"] = "finished"
    exit_code: int | None = None
    error: str | None = None
    counters: Counters = Field(default_factory=Counters)
    fault_percentiles: dict[str, float] = Field(default_factory=dict)
    fault_histogram: FaultHistogram = Field(default_factory=FaultHistogram)
    marks: list[tuple[int, int, float]] = Field(default_factory=list)  # (vcpu, value, time)


class Failed(_Model):
    """The fragment could not run or go on (a lost peer, a stop during start-up)."""

    event: Literal["failed"] = "failed"
    error: str


class Paused(_Model):
    """The vCPUs are held outside the guest (PAUSE_SIGNAL); the fabric serves on."""

    event: Literal["paused"] = "paused"


class Resumed(_Model):
    """The vCPUs run the guest again (RESUME_SIGNAL)."""

    event: Literal["resumed"] = "resumed"


FragmentEvent = Annotated[
    Listening | Connected | Finished | Failed | Paused | Resumed, Field(discriminator="event")
]
_EVENT: TypeAdapter[FragmentEvent] = TypeAdapter(FragmentEvent)


class EventWriter:
    """The fragment's one emitter: an event per line on the status stream (none: dropped)."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream

    def __call__(self, event: FragmentEvent) -> None:
        if self.stream is not None:
            self.stream.write(event.model_dump_json() + "\n")
            self.stream.flush()


Emit = Callable[[FragmentEvent], None]


def parse_event(line: str) -> FragmentEvent:
    """One status line; ContractError if it is not an event of this contract."""
    try:
        return _EVENT.validate_json(line)
    except ValidationError as err:
        raise ContractError(f"not a fragment event: {line.strip()[:200]!r} ({err})") from None


def parse_events(text: str) -> list[FragmentEvent]:
    """Every complete event of a status stream; a last line still being written is left out."""
    out = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n") or not line.strip():
            continue
        out.append(parse_event(line))
    return out


def last_of(events: Iterable[FragmentEvent], kind: type[E]) -> E | None:
    """The last event of one kind, or None."""
    found = None
    for event in events:
        if isinstance(event, kind):
            found = event
    return found
