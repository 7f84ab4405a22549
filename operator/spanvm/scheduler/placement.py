"""The scheduler: a SpanningVM's request and a cluster snapshot in, a placement or a reason out.

Filter: KVM-capable, Ready nodes with a fresh heartbeat that match the node selector, tolerate
the taints and have room after what placed fragments use. Score: fewest fragments first (each
one more costs fabric traffic), then fabric locality (all in one zone, then one rack), then
balance (the most free capacity left on the fullest chosen node), then node names, so the
same input always gives the same output. All or nothing: a VM is placed whole or not at all.
Memory is split in proportion to vCPUs, in 2 MiB units.
"""

from collections import defaultdict
from dataclasses import dataclass

from spanvm.api.quantity import MEMORY_ALIGNMENT, format_memory
from spanvm.scheduler.snapshot import NodeInfo, Request, Usage

MAX_FRAGMENTS = 64
NAMED_NODES = 3  # excluded nodes named in an explanation, per reason


@dataclass(frozen=True)
class Fragment:
    """One placed fragment: its node, its vCPU ids and its share of memory."""

    node: str
    vcpu_ids: tuple[int, ...]
    memory: int


@dataclass(frozen=True)
class Placement:
    """Where every fragment of the VM goes (fragment 0 holds vCPU 0)."""

    fragments: tuple[Fragment, ...]


@dataclass(frozen=True)
class Unschedulable:
    """Why the VM cannot be placed now, in words a person can act on."""

    message: str


@dataclass(frozen=True)
class _Candidate:
    node: NodeInfo
    free_vcpus: int
    free_memory: int

    def capacity(self, request: Request) -> int:
        """vCPUs this node can take with their proportional memory share."""
        by_memory = self.free_memory * request.vcpus // request.memory
        return min(self.free_vcpus, by_memory)


def _filter(
    nodes: list[NodeInfo], usage: dict[str, Usage], request: Request
) -> tuple[list[_Candidate], dict[str, list[str]]]:
    out: list[_Candidate] = []
    rejected: dict[str, list[str]] = defaultdict(list)
    for node in nodes:
        used = usage.get(node.name, Usage())
        if not node.kvm:
            rejected["without working KVM"].append(node.name)
        elif not node.ready:
            rejected["not Ready"].append(node.name)
        elif not node.heartbeat_fresh:
            rejected["with a stale agent heartbeat"].append(node.name)
        elif any(node.labels.get(k) != v for k, v in request.node_selector.items()):
            rejected["not matching nodeSelector"].append(node.name)
        elif any(
            t.effect in ("NoSchedule", "NoExecute")
            and not any(tol.tolerates(t) for tol in request.tolerations)
            for t in node.taints
        ):
            rejected["with untolerated taints"].append(node.name)
        else:
            candidate = _Candidate(node, node.vcpus - used.vcpus, node.memory - used.memory)
            if candidate.capacity(request) < request.min_vcpus_per_fragment:
                rejected["too full"].append(node.name)
            else:
                out.append(candidate)
    return out, rejected


def _split_vcpus(capacities: list[int], total: int, minimum: int) -> list[int] | None:
    """vCPUs per chosen node: at least `minimum` each, within capacity, as even as possible
    (deterministic water-filling); None if impossible."""
    k = len(capacities)
    if k * minimum > total or sum(capacities) < total or min(capacities) < minimum:
        return None
    shares = [minimum] * k
    left = total - k * minimum
    while left:
        open_slots = [i for i in range(k) if shares[i] < capacities[i]]
        if not open_slots:
            return None
        for i in sorted(open_slots, key=lambda i: (shares[i], i)):
            if not left:
                break
            shares[i] += 1
            left -= 1
    return shares


def _memory_shares(vcpus: list[int], free: list[int], request: Request) -> list[int] | None:
    """Memory per fragment in proportion to its vCPUs (2 MiB units); the rounding remainder
    goes, a unit at a time, to fragments with room. None if it does not fit."""
    units = request.memory // MEMORY_ALIGNMENT
    shares = [units * v // request.vcpus for v in vcpus]
    for i in range(len(shares)):
        while sum(shares) < units and (shares[i] + 1) * MEMORY_ALIGNMENT <= free[i]:
            shares[i] += 1
    if sum(shares) < units:
        return None
    return [s * MEMORY_ALIGNMENT for s in shares]


def _try(chosen: list[_Candidate], request: Request) -> tuple[tuple[int, ...], Placement] | None:
    vcpus = _split_vcpus(
        [c.capacity(request) for c in chosen], request.vcpus, request.min_vcpus_per_fragment
    )
    if vcpus is None:
        return None
    memory = _memory_shares(vcpus, [c.free_memory for c in chosen], request)
    if memory is None or any(
        m > c.free_memory or v > c.free_vcpus for m, v, c in zip(memory, vcpus, chosen, strict=True)
    ):
        return None
    fragments, next_id = [], 0
    for c, v, m in zip(chosen, vcpus, memory, strict=True):
        fragments.append(Fragment(c.node.name, tuple(range(next_id, next_id + v)), m))
        next_id += v
    zones = {c.node.zone for c in chosen}
    racks = {(c.node.zone, c.node.rack) for c in chosen}
    slack = min(c.free_vcpus - v for c, v in zip(chosen, vcpus, strict=True))
    score = (len(zones) > 1, len(racks) > 1, -slack)
    return score, Placement(tuple(fragments))


def schedule(
    nodes: list[NodeInfo], usage: dict[str, Usage], request: Request
) -> Placement | Unschedulable:
    """Place the VM whole, or say why not."""
    candidates, rejected = _filter(nodes, usage, request)
    limit = min(request.max_fragments or MAX_FRAGMENTS, request.vcpus, MAX_FRAGMENTS)
    by_capacity = sorted(candidates, key=lambda c: (-c.capacity(request), c.node.name))
    groups: dict[tuple[str, ...], list[_Candidate]] = {(): by_capacity}
    for c in by_capacity:
        groups.setdefault((c.node.zone,), []).append(c)
        groups.setdefault((c.node.zone, c.node.rack), []).append(c)
    for k in range(1, limit + 1):
        best: tuple[tuple[int, ...], tuple[str, ...], Placement] | None = None
        for group in groups.values():
            if len(group) < k:
                continue
            tried = _try(group[:k], request)
            if tried is None:
                continue
            score, placement = tried
            key = (score, tuple(f.node for f in placement.fragments), placement)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is not None:
            return best[2]
    return Unschedulable(_explain(by_capacity, rejected, request, limit))


def _excluded(why: str, names: list[str]) -> str:
    """`2 too full (a, b)`: nodes are named (a few of them), so a person knows where to look."""
    names = sorted(names)
    shown = ", ".join(names[:NAMED_NODES]) + (", ..." if len(names) > NAMED_NODES else "")
    return f"{len(names)} {why} ({shown})"


def _explain(
    candidates: list[_Candidate], rejected: dict[str, list[str]], request: Request, limit: int
) -> str:
    need = f"needs {request.vcpus} vCPUs and {format_memory(request.memory)}"
    if request.min_vcpus_per_fragment > 1:
        need += f" (at least {request.min_vcpus_per_fragment} vCPUs per fragment)"
    if candidates:
        top = candidates[:limit]
        caps = "+".join(str(c.capacity(request)) for c in top)
        plural = "s" if len(top) > 1 else ""
        have = f"the best {len(top)} node{plural} can take {caps} vCPUs with their memory share"
    else:
        have = "no node is eligible"
    parts = [need, have, f"maxFragments={request.max_fragments or limit}"]
    if rejected:
        parts.append(
            "excluded: "
            + "; ".join(_excluded(why, names) for why, names in sorted(rejected.items()))
        )
    return "; ".join(parts)
