"""Prometheus metrics of the node agent, per fragment on its node (served on --metrics-port).

Read at scrape time from what the agent already knows: each VMFragment bound to the node and
the status it last reported (phase), its spec (vCPUs), and the fragment process's own status
events (fabric counters and the remote fault latency histogram, written when the fragment
finishes). Plus whether KVM is usable here.
"""

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from spanvm.agent.controller import Agent
from spanvm.api.constants import VM_LABEL
from spanvm.contract import Finished, FragmentEvent, last_of
from spanvm.kube import JsonObject

PAGE_SIZE = 4096
LABELS = ["namespace", "vm", "fragment"]
PHASE_LABELS = [*LABELS, "phase"]
DIRECTION_LABELS = [*LABELS, "direction"]


def _labels(fragment: JsonObject) -> list[str]:
    meta = fragment["metadata"]
    vm = fragment["spec"].get("vmName") or (meta.get("labels") or {}).get(VM_LABEL, "")
    return [meta["namespace"], str(vm), str(fragment["spec"].get("index", ""))]


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (5e-05, 0.001, +Inf)."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


def _finished(events: list[FragmentEvent]) -> Finished:
    """The fragment's `finished` event, or all zeroes while it runs."""
    return last_of(events, Finished) or Finished()


class FragmentCollector(Collector):
    """Per-fragment gauges, counters and the remote fault latency histogram."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        kvm = GaugeMetricFamily(
            "spanvm_agent_kvm_usable", "1 while this node's /dev/kvm works.", labels=["node"]
        )
        kvm.add_metric([agent.node], int(agent.publisher.kvm_usable))
        yield kvm
        phase = GaugeMetricFamily(
            "spanvm_fragment_phase",
            "1 for each fragment's current phase.",
            labels=PHASE_LABELS,
        )
        vcpus = GaugeMetricFamily(
            "spanvm_fragment_vcpus", "vCPUs the fragment runs.", labels=LABELS
        )
        faults = CounterMetricFamily(
            "spanvm_fragment_page_faults", "Guest page faults the fabric served.", labels=LABELS
        )
        remote = CounterMetricFamily(
            "spanvm_fragment_remote_faults", "Faults served from another fragment.", labels=LABELS
        )
        pages = CounterMetricFamily(
            "spanvm_fragment_fabric_pages",
            "Pages moved by the fabric.",
            labels=DIRECTION_LABELS,
        )
        moved = CounterMetricFamily(
            "spanvm_fragment_fabric_bytes",
            "Bytes moved by the fabric.",
            labels=DIRECTION_LABELS,
        )
        invalidations = CounterMetricFamily(
            "spanvm_fragment_invalidations", "Pages this fragment invalidated.", labels=LABELS
        )
        latency = HistogramMetricFamily(
            "spanvm_fragment_remote_fault_seconds",
            "Time to serve a fault from another fragment.",
            labels=LABELS,
        )
        for uid, fragment in list(agent.fragments_seen.items()):
            labels = _labels(fragment)
            status = agent.reported.get(uid) or fragment.get("status") or {}
            phase.add_metric([*labels, str(status.get("phase") or "Pending")], 1)
            vcpus.add_metric(labels, len(fragment["spec"].get("vcpuIds") or []))
            proc = agent.processes.get(uid)
            done = _finished(proc.events() if proc is not None else [])
            faults.add_metric(labels, done.counters.page_faults)
            remote.add_metric(labels, done.counters.remote_faults)
            invalidations.add_metric(labels, done.counters.invalidations)
            for direction, count in (
                ("in", done.counters.pages_in),
                ("out", done.counters.pages_out),
            ):
                pages.add_metric([*labels, direction], count)
                moved.add_metric([*labels, direction], count * PAGE_SIZE)
            histogram = done.fault_histogram
            buckets = [(_le(le), float(n)) for le, n in histogram.buckets]
            latency.add_metric(
                labels, [*buckets, ("+Inf", float(histogram.samples))], histogram.seconds_sum
            )
        yield from (phase, vcpus, faults, remote, pages, moved, invalidations, latency)
