"""From a SpanningVM and its placement to the objects that run it: the scheduler request, the
recorded placement, the VMFragment bodies, their peer lists and the fabric Secret."""

import base64
import secrets
from typing import Any

from spanvm.api.constants import (
    API_VERSION,
    FABRIC_SECRET_KEY,
    INDEX_LABEL,
    NODE_LABEL,
    VM_LABEL,
    fabric_secret_name,
    fragment_name,
    label_value,
)
from spanvm.api.quantity import format_memory, parse_memory, parse_quantity_bytes
from spanvm.api.spanningvm import FabricSpec, FragmentSummary, SpanningVMSpec
from spanvm.api.vmfragment import MemoryRange, Peer, SecretRef, VMFragmentSpec
from spanvm.controller.cluster_view import NodeHealth, health_of
from spanvm.fabric.homes import plan_homes
from spanvm.kube import JsonObject
from spanvm.scheduler.placement import Placement
from spanvm.scheduler.snapshot import Request, Toleration

SYSTEM_LABEL_PREFIXES = ("spanvm.io/", "kopf.zalando.org/")


def request_of(spec: SpanningVMSpec) -> Request:
    """What the scheduler must find room for."""
    placement = spec.placement
    return Request(
        vcpus=spec.cpu.vcpus,
        memory=parse_memory(spec.memory),
        max_fragments=placement.max_fragments if placement else None,
        min_vcpus_per_fragment=placement.min_vcpus_per_fragment if placement else 1,
        node_selector=dict(placement.node_selector or {}) if placement else {},
        tolerations=tuple(
            Toleration(t.key, t.operator, t.value, t.effect)
            for t in (placement.tolerations or [] if placement else [])
        ),
    )


def recorded_placement(vm_name: str, placement: Placement) -> list[FragmentSummary]:
    """The placement as written to status.fragments before any fragment is created."""
    return [
        FragmentSummary(
            name=fragment_name(vm_name, index),
            node_name=f.node,
            vcpu_ids=list(f.vcpu_ids),
            memory=format_memory(f.memory),
            phase="Pending",
        )
        for index, f in enumerate(placement.fragments)
    ]


def owner_reference(vm: JsonObject) -> dict[str, Any]:
    meta = vm["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": "SpanningVM",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def fabric_vouches(
    placed: list[FragmentSummary], fragments: dict[int, JsonObject], health: dict[str, NodeHealth]
) -> bool:
    """Whether the memory fabric shows the guest alive in spite of lost nodes: some fragment
    runs on a healthy node and every fragment is Running. A peer that stopped answering
    would have failed them (the fabric's own liveness timeout), so they vouch for the rest;
    a guest on lost nodes only has no one to vouch for it."""
    phases = [
        ((fragments.get(i) or {}).get("status") or {}).get("phase") for i in range(len(placed))
    ]
    healthy = [i for i, p in enumerate(placed) if health_of(health, p.node_name).healthy]
    return bool(healthy) and all(p == "Running" for p in phases)


def owner_vm_name(obj: JsonObject) -> str | None:
    """The name of the SpanningVM controlling `obj`, from its owner reference."""
    for owner in obj["metadata"].get("ownerReferences") or []:
        if owner.get("kind") == "SpanningVM" and owner.get("apiVersion") == API_VERSION:
            return str(owner["name"])
    return None


def user_labels(vm: JsonObject) -> dict[str, str]:
    """The VM's own labels, carried to its fragments (spanvm's and Kopf's left out)."""
    labels: dict[str, str] = vm["metadata"].get("labels") or {}
    return {k: v for k, v in labels.items() if not k.startswith(SYSTEM_LABEL_PREFIXES)}


def fragment_labels(vm: JsonObject, index: int, node: str) -> dict[str, str]:
    return {
        **user_labels(vm),
        VM_LABEL: label_value(vm["metadata"]["name"]),
        NODE_LABEL: label_value(node),
        INDEX_LABEL: str(index),
    }


def fragment_body(
    vm: JsonObject, spec: SpanningVMSpec, placed: list[FragmentSummary], index: int
) -> JsonObject:
    """The VMFragment for entry `index` of the recorded placement, without peers."""
    entry = placed[index]
    fabric = spec.fabric or FabricSpec()
    homes = plan_homes(
        parse_memory(spec.memory),
        [parse_quantity_bytes(p.memory) for p in placed],
        fabric.home_policy,
        platform=spec.boot.linux is not None,  # a kernel owns its memory from 0
    )
    frag_spec = VMFragmentSpec(
        vm_name=vm["metadata"]["name"],
        index=index,
        fragment_count=len(placed),
        node_name=entry.node_name,
        vcpu_ids=entry.vcpu_ids,
        vcpu_count=spec.cpu.vcpus,
        memory=spec.memory,
        home_memory=[
            MemoryRange(start=h.start, size=h.end - h.start) for h in homes if h.index == index
        ],
        boot=spec.boot,
        fabric=fabric,
        secret_ref=SecretRef(
            name=fabric_secret_name(vm["metadata"]["name"], vm["metadata"]["uid"])
        ),
    )
    return {
        "apiVersion": API_VERSION,
        "kind": "VMFragment",
        "metadata": {
            "name": entry.name,
            "namespace": vm["metadata"]["namespace"],
            "labels": fragment_labels(vm, index, entry.node_name),
            "ownerReferences": [owner_reference(vm)],
        },
        "spec": frag_spec.to_api(),
    }


def fragment_bodies(
    vm: JsonObject, spec: SpanningVMSpec, placed: list[FragmentSummary], have: dict[int, JsonObject]
) -> dict[int, JsonObject]:
    """The VMFragments of the recorded placement missing from `have` (by index), in the
    order to create them, each with its peer list as it stands (every fragment's node and
    home ranges, the endpoints reported so far): a fragment is not written a second time
    just to learn its peers.

    Fragment 0 comes last and its peers tell its agent that every fragment exists (the
    others cannot start before fragment 0 reports an endpoint): the executor creates it
    without them (`hold_back_peers`) when another one could not be created."""
    missing = [i for i in range(1, len(placed)) if i not in have]
    if 0 not in have:
        missing.append(0)
    bodies = {i: fragment_body(vm, spec, placed, i) for i in missing}
    peers = peers_of(placed, {**have, **bodies})
    for body in bodies.values():
        body["spec"]["peers"] = peers
    return bodies


def hold_back_peers(body: JsonObject, exist: set[int], count: int) -> None:
    """Fragment 0 is created without peers unless every other fragment exists (indexes in
    `exist`): its agent would start the guest with part of it missing."""
    if body["spec"]["index"] == 0 and not exist.issuperset(range(1, count)):
        del body["spec"]["peers"]


def peers_of(placed: list[FragmentSummary], fragments: dict[int, JsonObject]) -> list[JsonObject]:
    """Every fragment of the VM: node, home ranges and the fabric endpoint it reported (once
    known). The agent of fragment i starts it once every lower index has an endpoint."""
    out = []
    for index, entry in enumerate(placed):
        fragment = fragments.get(index) or {}
        endpoint = (fragment.get("status") or {}).get("endpoint")
        homes = (fragment.get("spec") or {}).get("homeMemory") or []
        peer = Peer(index=index, node_name=entry.node_name, endpoint=endpoint, home_memory=homes)
        out.append(peer.to_api())
    return out


def fabric_secret(vm: JsonObject) -> JsonObject:
    """A fresh per-VM fabric key, owned by the VM (kept if it exists already)."""
    key = secrets.token_hex(32).encode()
    name = vm["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": fabric_secret_name(name, vm["metadata"]["uid"]),
            "namespace": vm["metadata"]["namespace"],
            "labels": {VM_LABEL: label_value(name)},
            "ownerReferences": [owner_reference(vm)],
        },
        "type": "Opaque",
        "data": {FABRIC_SECRET_KEY: base64.b64encode(key).decode()},
    }
