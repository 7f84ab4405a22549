"""The scheduler: a SpanningVM's request and a cluster snapshot in, a placement or a reason out.

Filter: KVM-capable, Ready nodes with a fresh heartbeat that match the node selector, tolerate
the taints and have room after what placed fragments use. Score: fewest fragments first (each
one more costs fabric traffic), then fabric locality (all in one zone, then one rack), then
balance (the most free capacity left on the fullest chosen node), then node names, so the
same input always gives the same output. All or nothing: a VM is placed whole or not at all.
Memory is split by `spanvm.shares.memory_shares` (in proportion to vCPUs, 2 MiB units).

Fast at 5,000 nodes: `ClusterIndex` holds the nodes as arrays, so the filter is a few vector
operations; each group's best `maxFragments` nodes are picked by one partial sort of a key
that orders them (most capacity, then name), and only those become Python objects. The
search tries a fragment count only where the group's best nodes can hold the vCPUs at all.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import attrgetter
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from spanvm.api.quantity import format_memory
from spanvm.scheduler.snapshot import NodeInfo, Request, Usage
from spanvm.shares import memory_shares

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


class _Candidate(NamedTuple):
    node: NodeInfo
    free_vcpus: int
    free_memory: int
    capacity: int  # vCPUs this node can take with their proportional memory share


_REASONS = (
    "",
    "without working KVM",
    "not Ready",
    "with a stale agent heartbeat",
    "not matching nodeSelector",
    "with untolerated taints",
    "too full",
)
_KVM, _READY, _HEARTBEAT, _SELECTOR, _TAINTS, _FULL = range(1, 7)
_NEVER = np.iinfo(np.int64).max  # the order key of an excluded node: after every candidate
Ints = npt.NDArray[np.int64]
_VCPUS, _MEMORY = attrgetter("vcpus"), attrgetter("memory")


class ClusterIndex:
    """The nodes as arrays, built once per node snapshot: every request is then filtered
    with a few vector operations instead of a Python loop over the nodes. Labels a request
    selects on are indexed on first use; taints are kept for the few nodes that have them."""

    def __init__(self, nodes: Iterable[NodeInfo]) -> None:
        self.nodes = sorted(nodes, key=lambda n: n.name)
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        self.vcpus = np.array([n.vcpus for n in self.nodes], dtype=np.int64)
        self.memory = np.array([n.memory for n in self.nodes], dtype=np.int64)
        static = np.zeros(len(self.nodes), dtype=np.int64)
        for i, n in enumerate(self.nodes):
            if not n.kvm:
                static[i] = _KVM
            elif not n.ready:
                static[i] = _READY
            elif not n.heartbeat_fresh:
                static[i] = _HEARTBEAT
        self.static = static
        self.tainted = [
            (i, hard)
            for i, n in enumerate(self.nodes)
            if (hard := tuple(t for t in n.taints if t.effect in ("NoSchedule", "NoExecute")))
        ]
        zones = {z: c for c, z in enumerate(sorted({n.zone for n in self.nodes}))}
        racks = {r: c for c, r in enumerate(sorted({(n.zone, n.rack) for n in self.nodes}))}
        zone = np.array([zones[n.zone] for n in self.nodes], dtype=np.int64)
        rack = np.array([racks[(n.zone, n.rack)] for n in self.nodes], dtype=np.int64)
        # The nodes of each zone, then of each rack (positions): the groups a placement may
        # keep to, besides the whole cluster.
        self.groups = [np.flatnonzero(zone == z) for z in range(len(zones))] + [
            np.flatnonzero(rack == r) for r in range(len(racks))
        ]
        self._order_base = int(self.vcpus.max(initial=0)) + 1
        self._labels: dict[tuple[str, str], npt.NDArray[np.bool_]] = {}

    def _label(self, key: str, value: str) -> npt.NDArray[np.bool_]:
        mask = self._labels.get((key, value))
        if mask is None:
            mask = np.array([n.labels.get(key) == value for n in self.nodes], dtype=np.bool_)
            self._labels[(key, value)] = mask
        return mask

    def used(self, usage: Mapping[str, Usage]) -> tuple[Ints, Ints]:
        """vCPUs and memory used per node (positions), from usage by node name; names of
        nodes not in the index are left out."""
        used_v = np.zeros(len(self.nodes), dtype=np.int64)
        used_m = np.zeros(len(self.nodes), dtype=np.int64)
        if usage:
            count, values = len(usage), usage.values()
            at = np.fromiter(map(self.position.get, usage, repeat(-1)), np.int64, count)
            known = at >= 0
            used_v[at[known]] = np.fromiter(map(_VCPUS, values), np.int64, count)[known]
            used_m[at[known]] = np.fromiter(map(_MEMORY, values), np.int64, count)[known]
        return used_v, used_m

    def filter(self, usage: Mapping[str, Usage], request: Request) -> tuple[Ints, Ints, Ints, Ints]:
        """Per node: why it is excluded (0: a candidate), free vCPUs, free memory, and the
        vCPUs it can take with their proportional memory share."""
        used_v, used_m = self.used(usage)
        free_v, free_m = self.vcpus - used_v, self.memory - used_m
        capacity = np.minimum(free_v, free_m * request.vcpus // request.memory)
        code = self.static.copy()
        open_ = code == 0
        for key, value in request.node_selector.items():
            code[open_ & ~self._label(key, value)] = _SELECTOR
            open_ = code == 0
        for i, taints in self.tainted:
            if code[i] == 0 and any(
                not any(tol.tolerates(t) for tol in request.tolerations) for t in taints
            ):
                code[i] = _TAINTS
        code[(code == 0) & (capacity < request.min_vcpus_per_fragment)] = _FULL
        return code, free_v, free_m, capacity

    def schedule(self, usage: Mapping[str, Usage], request: Request) -> Placement | Unschedulable:
        """Place the VM whole, or say why not."""
        code, free_v, free_m, capacity = self.filter(usage, request)
        limit = min(request.max_fragments or MAX_FRAGMENTS, request.vcpus, MAX_FRAGMENTS)
        count = len(self.nodes)
        # One order key per node, unique: most capacity first, ties by name (positions are
        # in name order); excluded nodes last. A group's best nodes are its smallest keys.
        key = np.where(code == 0, (self._order_base - capacity) * count, _NEVER)
        key[code == 0] += np.flatnonzero(code == 0)
        picks = [_best(key, limit, count)] + [_best(key[g], limit, count) for g in self.groups]
        chosen = sorted({i for pick in picks for i in pick})
        at = np.array(chosen, dtype=np.int64)
        candidate = {
            i: _Candidate(self.nodes[i], v, m, c)
            for i, v, m, c in zip(
                chosen,
                free_v[at].tolist(),
                free_m[at].tolist(),
                capacity[at].tolist(),
                strict=True,
            )
        }
        groups = [[candidate[i] for i in pick] for pick in picks]
        found = _search(groups, request, limit)
        if found is not None:
            return found
        rejected = {
            _REASONS[c]: [self.nodes[i].name for i in np.flatnonzero(code == c)]
            for c in range(1, len(_REASONS))
            if (code == c).any()
        }
        return Unschedulable(_explain(groups[0], rejected, request, limit))


def _best(key: Ints, limit: int, count: int) -> list[int]:
    """The positions of the `limit` candidates with the smallest keys, best first."""
    if len(key) > limit:
        key = np.partition(key, limit - 1)[:limit]
    key = np.sort(key)
    return (key[key != _NEVER] % count).tolist()  # type: ignore[no-any-return]


def _split_vcpus(capacities: list[int], total: int, minimum: int) -> list[int] | None:
    """vCPUs per chosen node: at least `minimum` each, within capacity, as even as possible;
    None if impossible. Water-filling: every node gets min(capacity, level) for the highest
    level that fits, and the remainder goes one vCPU each to the lowest-index nodes that
    have room above the level (the order of raising every share one vCPU at a time)."""
    k = len(capacities)
    if k * minimum > total or sum(capacities) < total or min(capacities) < minimum:
        return None
    left, open_slots = total, k
    for cap in sorted(capacities):
        if cap * open_slots > left:
            break
        left -= cap  # this node is filled to its capacity below the level
        open_slots -= 1
    if not open_slots:
        return list(capacities)
    level, extra = divmod(left, open_slots)
    shares = []
    for cap in capacities:
        if cap <= level:
            shares.append(cap)
        else:
            shares.append(level + (1 if extra else 0))
            extra -= 1 if extra else 0
    return shares


def _try(chosen: list[_Candidate], request: Request) -> tuple[tuple[int, ...], Placement] | None:
    vcpus = _split_vcpus(
        [c.capacity for c in chosen], request.vcpus, request.min_vcpus_per_fragment
    )
    if vcpus is None:
        return None
    memory = memory_shares(request.memory, vcpus, [c.free_memory for c in chosen])
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


def _search(groups: list[list[_Candidate]], request: Request, limit: int) -> Placement | None:
    """Fewest fragments first; for each count, the best-scoring group's top nodes. A group
    is tried from the count at which its best nodes can take every vCPU."""
    fewest = []
    for group in groups:
        held = accumulate(c.capacity for c in group)
        fewest.append(next((k for k, s in enumerate(held, 1) if s >= request.vcpus), limit + 1))
    for k in range(min(fewest, default=limit + 1), limit + 1):
        if k * request.min_vcpus_per_fragment > request.vcpus:
            return None  # more fragments cannot each hold the minimum either
        best: tuple[tuple[int, ...], tuple[str, ...], Placement] | None = None
        tried_sets: set[tuple[str, ...]] = set()
        for group, need in zip(groups, fewest, strict=True):
            if k < need or len(group) < k:
                continue  # too small: its best k nodes cannot take the vCPUs
            chosen = tuple(c.node.name for c in group[:k])
            if chosen in tried_sets:
                continue  # the same nodes as a group already tried
            tried_sets.add(chosen)
            tried = _try(group[:k], request)
            if tried is None:
                continue
            score, placement = tried
            key = (score, tuple(f.node for f in placement.fragments), placement)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is not None:
            return best[2]
    return None


def schedule(
    nodes: list[NodeInfo], usage: Mapping[str, Usage], request: Request
) -> Placement | Unschedulable:
    """Place the VM whole, or say why not (the operator keeps a ClusterIndex between
    decisions instead: building one reads every node)."""
    return ClusterIndex(nodes).schedule(usage, request)


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
        caps = "+".join(str(c.capacity) for c in top)
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
