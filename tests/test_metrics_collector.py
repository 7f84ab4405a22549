"""The leader's cluster gauges come from the watch caches: a scrape makes no API request (the
caches here have no API server behind them at all) and counts what the caches hold."""

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from spanvm.api.constants import KVM_LABEL, agent_lease_name
from spanvm.controller.cache import ClusterCache
from spanvm.controller.metrics import ClusterCollector
from spanvm.kube import JsonObject, Kube


def no_api(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("a scrape asked the API server")


def cache() -> ClusterCache:
    api = SimpleNamespace(
        custom=SimpleNamespace(list_cluster_custom_object=no_api),
        core=SimpleNamespace(list_node=no_api),
        coordination=SimpleNamespace(list_namespaced_lease=no_api),
    )
    kube: Kube = api  # type: ignore[assignment]
    return ClusterCache(kube, "spanvm-system")


def vm(namespace: str, name: str, version: int, **status: Any) -> JsonObject:
    meta = {"namespace": namespace, "name": name, "uid": name, "resourceVersion": str(version)}
    return {"kind": "SpanningVM", "metadata": meta, "status": status}


def scrape(collector: ClusterCollector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_gauges_count_what_the_caches_hold_in_the_watched_namespaces() -> None:
    caches = cache()
    caches.vms.assume(vm("a", "one", 1, phase="Running"))
    caches.vms.assume(vm("a", "two", 2))  # no status yet: Pending
    unplaced = {"type": "Scheduled", "status": "False", "reason": "Unschedulable"}
    caches.vms.assume(vm("a", "three", 3, phase="Pending", conditions=[unplaced]))
    caches.vms.assume(vm("other", "four", 4, phase="Running"))  # not watched
    for i, kvm in enumerate(("true", "true", "false")):
        labels = {KVM_LABEL: kvm}
        caches.nodes.assume({"metadata": {"name": f"n{i}", "labels": labels, "uid": str(i)}})
    lease = {
        "metadata": {"name": agent_lease_name("n0"), "namespace": "spanvm-system"},
        "spec": {"holderIdentity": "n0", "renewTime": "t1", "leaseDurationSeconds": 60},
    }
    caches.leases.assume(lease)

    got = scrape(ClusterCollector(caches, ["a"]))
    assert got['spanvm_vms{phase="Running"}'] == 1
    assert got['spanvm_vms{phase="Pending"}'] == 2
    assert got["spanvm_vms_pending"] == 2
    assert got['spanvm_vm_unschedulable{namespace="a",vm="three"}'] == 1
    assert got['spanvm_vm_unschedulable{namespace="a",vm="two"}'] == 0
    assert not any('vm="four"' in name for name in got)
    assert got["spanvm_nodes_kvm"] == 2
    assert got['spanvm_agent_heartbeat_fresh{node="n0"}'] == 1

    everywhere = scrape(ClusterCollector(caches, []))
    assert everywhere['spanvm_vms{phase="Running"}'] == 2
