"""Prometheus metrics of the operator (served on --metrics-port).

Counters and the reconcile histogram are updated by the handlers. The gauges of cluster state
(VMs by phase, pending and unschedulable VMs, nodes with KVM, agents' heartbeats) are read
from the operator's watch caches at scrape time by `ClusterCollector` (a scrape makes no API
request: listing a thousand Nodes took the operator ~1 s of CPU), registered only while this
replica leads: a standby would report the same VMs twice.
"""

from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from spanvm.api.constants import KVM_LABEL
from spanvm.api.phases import VMPhase
from spanvm.controller.cache import ClusterCache, in_namespaces
from spanvm.controller.cluster_view import HeartbeatObserver
from spanvm.kube import JsonObject
from spanvm.observability import exposition

BUILD_INFO = exposition.BUILD_INFO
RECONCILES = Counter("spanvm_reconcile_total", "SpanningVM reconciliations, by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "spanvm_reconcile_duration_seconds", "Time one SpanningVM reconciliation took."
)
PLACEMENTS = Counter("spanvm_placements_total", "SpanningVMs placed on nodes.")
UNSCHEDULABLE = Counter(
    "spanvm_unschedulable_total", "Scheduling attempts that found no placement."
)
FRAGMENTS_CREATED = Counter("spanvm_fragments_created_total", "VMFragment objects created.")
FAILURES = Counter("spanvm_vm_failures_total", "SpanningVMs that failed, by reason.", ["reason"])
RESTARTS = Counter("spanvm_vm_restarts_total", "Guests restarted under runStrategy Always.")
LEADER = Gauge("spanvm_operator_leader", "1 while this replica holds the operator Lease.")

PHASES: tuple[str, ...] = tuple(VMPhase)
NOT_PLACED = frozenset({"Pending", "Scheduling"})


def _phase(vm: JsonObject) -> str:
    return str((vm.get("status") or {}).get("phase") or "Pending")


def _unschedulable(vm: JsonObject) -> bool:
    for cond in (vm.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Scheduled":
            return bool(cond.get("status") == "False" and cond.get("reason") == "Unschedulable")
    return False


class ClusterCollector(Collector):
    """Gauges of what the caches hold (the API server's objects), read at each scrape."""

    def __init__(self, cache: ClusterCache, namespaces: list[str]) -> None:
        self.cache, self.namespaces = cache, frozenset(namespaces)
        self.heartbeats = HeartbeatObserver()

    def _vms(self) -> list[JsonObject]:
        vms = sorted(
            self.cache.vms.items(),
            key=lambda vm: (vm["metadata"].get("namespace", ""), vm["metadata"]["name"]),
        )
        return in_namespaces(vms, self.namespaces)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        vms = self._vms()
        by_phase = GaugeMetricFamily("spanvm_vms", "SpanningVMs by phase.", labels=["phase"])
        for phase in PHASES:
            by_phase.add_metric([phase], sum(_phase(vm) == phase for vm in vms))
        yield by_phase
        yield GaugeMetricFamily(
            "spanvm_vms_pending",
            "SpanningVMs not placed on nodes yet (Pending or Scheduling).",
            value=sum(_phase(vm) in NOT_PLACED for vm in vms),
        )
        each = GaugeMetricFamily(
            "spanvm_vm_phase",
            "1 for each SpanningVM's current phase.",
            labels=["namespace", "vm", "phase"],
        )
        unschedulable = GaugeMetricFamily(
            "spanvm_vm_unschedulable",
            "1 while the scheduler finds no placement for the SpanningVM (Scheduled=False,"
            " reason Unschedulable; the reason names what is missing).",
            labels=["namespace", "vm"],
        )
        for vm in vms:
            meta = vm["metadata"]
            each.add_metric([meta["namespace"], meta["name"], _phase(vm)], 1)
            unschedulable.add_metric([meta["namespace"], meta["name"]], int(_unschedulable(vm)))
        yield each
        yield unschedulable
        nodes = self.cache.nodes.items()
        yield GaugeMetricFamily(
            "spanvm_nodes_kvm",
            f"Nodes whose agent found a working /dev/kvm ({KVM_LABEL}=true).",
            value=sum((n["metadata"].get("labels") or {}).get(KVM_LABEL) == "true" for n in nodes),
        )
        fresh = self.heartbeats.observe(self.cache.leases.items())
        heartbeat = GaugeMetricFamily(
            "spanvm_agent_heartbeat_fresh",
            "1 while the node agent renews its heartbeat Lease (judged as the scheduler does).",
            labels=["node"],
        )
        for node, alive in sorted(fresh.items()):
            heartbeat.add_metric([node], int(alive))
        yield heartbeat
