"""The scheduler's nodes from Node objects (controller/cluster_view.NodeInfoMemo): the same
NodeInfo objects while nothing about a node changed, so the operator keeps its index."""

import copy
from typing import Any

from spanvm.api.constants import ALLOCATABLE_MEMORY_ANNOTATION, ALLOCATABLE_VCPUS_ANNOTATION
from spanvm.controller.cluster_view import NodeInfoMemo


def node(name: str, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"spanvm.io/kvm": "true"},
            "annotations": {
                ALLOCATABLE_VCPUS_ANNOTATION: "8",
                ALLOCATABLE_MEMORY_ANNOTATION: "32Gi",
            },
        },
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_nodes_are_read_once_and_kept_while_unchanged() -> None:
    memo = NodeInfoMemo()
    nodes = [node("b"), node("a")]
    first = memo.infos(nodes, {"a": True, "b": True})
    assert [n.name for n in first] == ["a", "b"]
    assert first[0].vcpus == 8 and first[0].memory == 32 << 30 and first[0].kvm
    again = memo.infos(nodes, {"a": True, "b": True})  # Leases renewed, nothing else
    assert all(x is y for x, y in zip(first, again, strict=True))
    # a heartbeat goes stale; a Node object is replaced (NotReady); a node goes away
    nodes[1] = node("a", ready=False)
    changed = memo.infos(nodes, {"a": True, "b": False})
    assert not changed[0].ready and not changed[1].heartbeat_fresh
    assert changed[0] is not first[0] and changed[1] is not first[1]
    assert [n.name for n in memo.infos([copy.deepcopy(nodes[0])], {"b": False})] == ["b"]
