"""What the scheduler sees: nodes (capability, health, capacity, labels, taints) and what the
VMFragments already placed on them use. Built by the operator from API objects; never from
the operator's own memory."""

from dataclasses import dataclass, field

ZONE_LABEL = "topology.kubernetes.io/zone"
RACK_LABEL = "spanvm.io/rack"


@dataclass(frozen=True)
class Taint:
    """A node taint (key, value, effect) as in the Node spec."""

    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True)
class NodeInfo:
    """One node as the scheduler needs it."""

    name: str
    kvm: bool  # the agent found a working /dev/kvm
    ready: bool  # Node Ready condition
    heartbeat_fresh: bool  # the agent's Lease was renewed recently
    vcpus: int  # allocatable vCPUs for guests
    memory: int  # allocatable guest memory, bytes
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()

    @property
    def zone(self) -> str:
        return self.labels.get(ZONE_LABEL, "")

    @property
    def rack(self) -> str:
        return self.labels.get(RACK_LABEL, "")


@dataclass(frozen=True)
class Usage:
    """vCPUs and memory already taken on a node by placed fragments."""

    vcpus: int = 0
    memory: int = 0


@dataclass(frozen=True)
class Toleration:
    """A toleration (as in SpanningVM spec.placement.tolerations)."""

    key: str | None = None
    operator: str = "Equal"
    value: str | None = None
    effect: str | None = None

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if self.operator == "Exists":
            return self.key in (None, "", taint.key)
        return self.key == taint.key and (self.value or "") == taint.value


@dataclass(frozen=True)
class Request:
    """What one SpanningVM asks for."""

    vcpus: int
    memory: int
    max_fragments: int | None = None
    min_vcpus_per_fragment: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
