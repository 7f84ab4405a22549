"""The scheduler's view of the cluster, built from API objects only.

Nodes (the agent's `spanvm.io/kvm` label and allocatable annotations, the Ready condition,
taints) and the agents' heartbeat Leases; what placed fragments use is `usage.py`. Pure
functions of those objects.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

from spanvm.api.constants import (
    AGENT_LEASE_PREFIX,
    ALLOCATABLE_MEMORY_ANNOTATION,
    ALLOCATABLE_VCPUS_ANNOTATION,
    KVM_LABEL,
    agent_lease_name,
)
from spanvm.api.quantity import parse_quantity_bytes
from spanvm.kube import JsonObject
from spanvm.scheduler.snapshot import NodeInfo, Taint


@dataclass(frozen=True)
class NodeHealth:
    """Whether a node can run fragments now, and if not, why (names the node)."""

    name: str
    healthy: bool
    reason: str = ""


def _ready(node: JsonObject) -> bool:
    for cond in node.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def lease_node(lease: JsonObject) -> str | None:
    """The node whose agent holds this heartbeat Lease (its holderIdentity: the Lease's name
    is shortened for long node names), or None for another kind of Lease."""
    name = str(lease["metadata"]["name"])
    if not name.startswith(AGENT_LEASE_PREFIX):
        return None
    holder = (lease.get("spec") or {}).get("holderIdentity")
    if holder and agent_lease_name(str(holder)) == name:
        return str(holder)
    return name.removeprefix(AGENT_LEASE_PREFIX)


class HeartbeatObserver:
    """Judges each agent's liveness by this process's own clock, as the node lifecycle
    controller judges a kubelet's Lease: a renewal is a renewTime *seen to change*, and an
    agent is alive while the last change was seen less than leaseDurationSeconds ago.

    The renewTime itself is another machine's clock and is never compared with ours: an agent
    whose clock is behind but who renews is alive; one whose clock is ahead but who stopped
    renewing is dead once a lease duration passes. A Lease seen for the first time (operator
    start, new node) gets one lease duration of benefit of the doubt."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seen: dict[str, tuple[str, float]] = {}  # node -> (renewal mark, seen at)

    def observe(self, leases: list[JsonObject]) -> dict[str, bool]:
        """Node name -> whether its agent is alive, from a fresh list of Leases."""
        now = self.clock()
        out, seen = {}, {}
        for lease in leases:
            node = lease_node(lease)
            if node is None:
                continue
            spec = lease.get("spec") or {}
            mark = f"{spec.get('holderIdentity')}@{spec.get('renewTime')}"
            last = self._seen.get(node)
            if last is None or last[0] != mark:
                last = (mark, now)
            seen[node] = last
            duration = float(spec.get("leaseDurationSeconds") or 0)
            out[node] = bool(spec.get("renewTime")) and now - last[1] < duration
        self._seen = seen
        return out


def _int_annotation(annotations: dict[str, str], key: str) -> int:
    try:
        return max(0, int(annotations.get(key, "0")))
    except ValueError:
        return 0


def node_info(node: JsonObject, fresh: bool) -> NodeInfo:
    """Scheduler NodeInfo for a Node object (`fresh`: its agent's heartbeat is)."""
    meta = node["metadata"]
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    try:
        memory = parse_quantity_bytes(annotations.get(ALLOCATABLE_MEMORY_ANNOTATION, "0"))
    except ValueError:
        memory = 0
    taints = tuple(
        Taint(t["key"], t.get("value") or "", t.get("effect") or "NoSchedule")
        for t in (node.get("spec") or {}).get("taints") or []
    )
    return NodeInfo(
        name=meta["name"],
        kvm=labels.get(KVM_LABEL) == "true",
        ready=_ready(node),
        heartbeat_fresh=fresh,
        vcpus=_int_annotation(annotations, ALLOCATABLE_VCPUS_ANNOTATION),
        memory=memory,
        labels=labels,
        taints=taints,
    )


class NodeInfoMemo:
    """Scheduler NodeInfo for every Node object, by name. Each node's NodeInfo is kept (the
    same object) while its Node object and its heartbeat's freshness stay the same: a
    thousand agents renew their Leases all the time, their Nodes rarely change, and a
    scheduler index of the same NodeInfos can be kept (24 ms to rebuild at 1,000 nodes)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[JsonObject, bool, NodeInfo]] = {}

    def infos(self, nodes: list[JsonObject], fresh: dict[str, bool]) -> list[NodeInfo]:
        """The nodes' NodeInfos sorted by name (`fresh`: node -> its heartbeat is fresh)."""
        held: dict[str, tuple[JsonObject, bool, NodeInfo]] = {}
        for node in nodes:
            name = node["metadata"]["name"]
            alive = fresh.get(name, False)
            known = self._held.get(name)
            if known is None or known[0] is not node or known[1] != alive:
                known = (node, alive, node_info(node, alive))
            held[name] = known
        self._held = held
        return [held[name][2] for name in sorted(held)]


def node_health(nodes: list[NodeInfo]) -> dict[str, NodeHealth]:
    """Node name -> health as the node-loss check sees it: Ready with a fresh agent heartbeat
    (losing KVM stops new placements but does not stop running fragments)."""
    out = {}
    for node in nodes:
        if not node.ready:
            out[node.name] = NodeHealth(node.name, False, f"node {node.name} is NotReady")
        elif not node.heartbeat_fresh:
            reason = f"the agent on node {node.name} stopped heartbeating"
            out[node.name] = NodeHealth(node.name, False, reason)
        else:
            out[node.name] = NodeHealth(node.name, True)
    return out


def health_of(health: dict[str, NodeHealth], node: str) -> NodeHealth:
    return health.get(node) or NodeHealth(node, False, f"node {node} no longer exists")


def owned_by(obj: JsonObject, uid: str) -> bool:
    """Whether `obj` has an owner reference to the object with this uid."""
    return any(o.get("uid") == uid for o in obj["metadata"].get("ownerReferences") or [])
