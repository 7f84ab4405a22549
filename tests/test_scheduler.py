"""The scheduler as a pure function: generated clusters (hypothesis) and worked examples."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from spanvm.scheduler.placement import Placement, Unschedulable, _split_vcpus, schedule
from spanvm.scheduler.snapshot import ZONE_LABEL, NodeInfo, Request, Taint, Toleration, Usage

MiB, GiB = 1 << 20, 1 << 30


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[NodeInfo], dict[str, Usage], Request]:
    count = draw(st.integers(1, 12))
    nodes, usage = [], {}
    for i in range(count):
        vcpus = draw(st.integers(0, 16))
        memory = draw(st.integers(0, 64)) * 256 * MiB
        nodes.append(
            NodeInfo(
                name=f"node-{i:02d}",
                kvm=draw(st.booleans()) or i % 3 == 0,
                ready=draw(st.booleans()) or i % 2 == 0,
                heartbeat_fresh=draw(st.integers(0, 9)) > 0,
                vcpus=vcpus,
                memory=memory,
                labels={
                    ZONE_LABEL: draw(st.sampled_from(["a", "b", "c"])),
                    "disk": draw(st.sampled_from(["ssd", "hdd"])),
                },
                taints=(Taint("dedicated", "db"),) if draw(st.integers(0, 5)) == 0 else (),
            )
        )
        if draw(st.booleans()):
            usage[f"node-{i:02d}"] = Usage(
                draw(st.integers(0, vcpus)), draw(st.integers(0, memory // MiB)) * MiB
            )
    vcpus = draw(st.integers(1, 40))
    request = Request(
        vcpus=vcpus,
        memory=draw(st.integers(8, 8 * 512)) * 2 * MiB,
        max_fragments=draw(st.one_of(st.none(), st.integers(1, 8))),
        min_vcpus_per_fragment=draw(st.integers(1, min(4, vcpus))),
        node_selector={"disk": "ssd"} if draw(st.integers(0, 3)) == 0 else {},
        tolerations=(Toleration("dedicated", "Exists"),) if draw(st.booleans()) else (),
    )
    return nodes, usage, request


@settings(max_examples=400, deadline=None)
@given(clusters())
def test_placements_are_whole_and_never_overcommit(
    case: tuple[list[NodeInfo], dict[str, Usage], Request],
) -> None:
    nodes, usage, request = case
    result = schedule(nodes, usage, request)
    if isinstance(result, Unschedulable):
        assert f"needs {request.vcpus} vCPUs" in result.message
        return
    by_name = {n.name: n for n in nodes}
    fragments = result.fragments
    assert len({f.node for f in fragments}) == len(fragments), "two fragments on one node"
    assert len(fragments) <= (request.max_fragments or 64)
    ids = [v for f in fragments for v in f.vcpu_ids]
    assert ids == list(range(request.vcpus)), "every vCPU exactly once, in order"
    assert sum(f.memory for f in fragments) == request.memory
    for f in fragments:
        node, used = by_name[f.node], usage.get(f.node, Usage())
        assert node.kvm and node.ready and node.heartbeat_fresh
        assert all(node.labels.get(k) == v for k, v in request.node_selector.items())
        assert not node.taints or request.tolerations
        assert len(f.vcpu_ids) >= request.min_vcpus_per_fragment
        assert used.vcpus + len(f.vcpu_ids) <= node.vcpus, "vCPUs over-committed"
        assert used.memory + f.memory <= node.memory, "memory over-committed"
        assert f.memory % (2 * MiB) == 0


@settings(max_examples=200, deadline=None)
@given(clusters(), st.randoms(use_true_random=False))
def test_same_input_same_output_whatever_the_order(
    case: tuple[list[NodeInfo], dict[str, Usage], Request], rnd: random.Random
) -> None:
    nodes, usage, request = case
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert schedule(nodes, usage, request) == schedule(shuffled, usage, request)


@settings(max_examples=200, deadline=None)
@given(clusters())
def test_one_fragment_when_one_node_suffices(
    case: tuple[list[NodeInfo], dict[str, Usage], Request],
) -> None:
    nodes, usage, request = case
    big = NodeInfo(
        "zz-big", True, True, True, request.vcpus, request.memory, {ZONE_LABEL: "a", "disk": "ssd"}
    )
    result = schedule([*nodes, big], usage, request)
    assert isinstance(result, Placement) and len(result.fragments) == 1


def _node(name: str, vcpus: int, memory: int, zone: str = "a", **kw: object) -> NodeInfo:
    return NodeInfo(
        name, kw.get("kvm", True), kw.get("ready", True), True, vcpus, memory, {ZONE_LABEL: zone}
    )  # type: ignore[arg-type]


def test_explains_why_it_cannot_place() -> None:
    nodes = [
        _node("a", 8, 16 * GiB),
        _node("b", 8, 16 * GiB),
        _node("c", 8, 16 * GiB),
        _node("d", 8, 16 * GiB, kvm=False),
    ]
    result = schedule(nodes, {}, Request(24, 8 * GiB, max_fragments=2))
    assert isinstance(result, Unschedulable)
    assert result.message == (
        "needs 24 vCPUs and 8Gi; the best 2 nodes can take 8+8 vCPUs with their memory share;"
        " maxFragments=2; excluded: 1 without working KVM (d)"
    )


def test_prefers_one_zone_then_balance() -> None:
    nodes = [
        _node("a1", 8, 32 * GiB, "a"),
        _node("b1", 8, 32 * GiB, "b"),
        _node("b2", 6, 32 * GiB, "b"),
    ]
    result = schedule(nodes, {}, Request(12, 4 * GiB))
    assert isinstance(result, Placement)
    assert [f.node for f in result.fragments] == ["b1", "b2"]
    assert [len(f.vcpu_ids) for f in result.fragments] == [6, 6]
    assert [f.memory for f in result.fragments] == [2 * GiB, 2 * GiB]


def test_usage_from_placed_fragments_counts() -> None:
    nodes = [_node("a", 8, 16 * GiB), _node("b", 8, 16 * GiB)]
    full = {"a": Usage(8, 0)}
    result = schedule(nodes, full, Request(8, 1 * GiB))
    assert isinstance(result, Placement) and [f.node for f in result.fragments] == ["b"]
    assert isinstance(
        schedule(nodes, {"a": Usage(8, 0), "b": Usage(1, 0)}, Request(8, 1 * GiB, max_fragments=1)),
        Unschedulable,
    )


def _split_one_at_a_time(capacities: list[int], total: int, minimum: int) -> list[int] | None:
    """The split by its definition: everyone starts at the minimum, then the vCPUs left are
    handed out one at a time to the node with the smallest share that has room (lowest
    index first)."""
    if len(capacities) * minimum > total or sum(capacities) < total:
        return None
    if min(capacities) < minimum:
        return None
    shares = [minimum] * len(capacities)
    for _ in range(total - sum(shares)):
        room = [i for i, c in enumerate(capacities) if shares[i] < c]
        shares[min(room, key=lambda i: (shares[i], i))] += 1
    return shares


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.integers(0, 24), min_size=1, max_size=8),
    st.integers(1, 100),
    st.integers(1, 4),
)
def test_vcpu_split_is_the_one_at_a_time_water_filling(
    capacities: list[int], total: int, minimum: int
) -> None:
    assert _split_vcpus(capacities, total, minimum) == _split_one_at_a_time(
        capacities, total, minimum
    )


def test_groups_keep_to_a_zone_among_many_equal_nodes() -> None:
    # 30 equal nodes over 3 zones, the first two zones mostly full: the two fragments
    # must come from one zone (the third), not from the first nodes by name.
    nodes = [_node(f"n{i:02d}", 8, 32 * GiB, "abc"[i // 10]) for i in range(30)]
    usage = {f"n{i:02d}": Usage(6, 0) for i in range(19)}
    result = schedule(nodes, usage, Request(16, 8 * GiB, max_fragments=2))
    assert isinstance(result, Placement)
    assert [f.node for f in result.fragments] == ["n20", "n21"]
