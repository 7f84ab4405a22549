"""What the agent says about its node: capability labels and annotations (NFD style, plus
the allocatable vCPUs and memory the scheduler reads) and the heartbeat Lease."""

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from nacl.public import PrivateKey

from spanvm.agent.capabilities import DETAILS_ANNOTATION, NodeCapabilities, discover
from spanvm.api.constants import (
    ALLOCATABLE_MEMORY_ANNOTATION,
    ALLOCATABLE_VCPUS_ANNOTATION,
    FABRIC_PUBLIC_KEY_ANNOTATION,
    agent_lease_name,
)
from spanvm.api.quantity import format_memory
from spanvm.kube import Kube
from spanvm.rfc3339 import micro_time
from spanvm.sealing import public_text

log = logging.getLogger("spanvm.agent")


@dataclass
class Offer:
    """Caps on what this node offers guests (simulated nodes share one machine)."""

    vcpus: int | None = None
    memory: int | None = None


def node_metadata(caps: NodeCapabilities, offer: Offer) -> tuple[dict[str, str], dict[str, str]]:
    """Labels and annotations for the Node."""
    vcpus = caps.allocatable_vcpus
    memory = caps.allocatable_memory
    if caps.kvm.usable:
        vcpus = min(vcpus, offer.vcpus) if offer.vcpus is not None else vcpus
        memory = min(memory, offer.memory) if offer.memory is not None else memory
    annotations = {
        DETAILS_ANNOTATION: caps.details(),
        ALLOCATABLE_VCPUS_ANNOTATION: str(vcpus),
        ALLOCATABLE_MEMORY_ANNOTATION: format_memory(memory) if memory else "0",
    }
    return caps.labels(), annotations


class NodePublisher:
    """Publishes capabilities (when they change) and renews the heartbeat Lease."""

    def __init__(
        self,
        kube: Kube,
        node: str,
        system_namespace: str,
        *,
        kvm_device: str,
        offer: Offer,
        lease_duration: int,
        node_key: PrivateKey | None = None,
    ) -> None:
        self.kube, self.node, self.namespace = kube, node, system_namespace
        self.kvm_device, self.offer, self.lease_duration = kvm_device, offer, lease_duration
        self.node_key = node_key  # fabric keys are sealed to its public half
        self._published: tuple[dict[str, str], dict[str, str]] | None = None
        self.kvm_usable = False

    def publish_capabilities(self) -> None:
        caps = discover(self.kvm_device)
        self.kvm_usable = caps.kvm.usable
        labels, annotations = node_metadata(caps, self.offer)
        if self.node_key is not None:
            annotations[FABRIC_PUBLIC_KEY_ANNOTATION] = public_text(self.node_key)
        if (labels, annotations) == self._published:
            return
        self.kube.patch_node_metadata(self.node, labels, annotations)
        self._published = (labels, annotations)
        if caps.kvm.usable:
            log.info(
                "node %s: KVM usable (%s); offering %s vCPUs, %s",
                self.node,
                caps.flavour,
                annotations[ALLOCATABLE_VCPUS_ANNOTATION],
                annotations[ALLOCATABLE_MEMORY_ANNOTATION],
            )
        else:
            log.warning(
                "node %s: KVM not usable (%s): not schedulable for guests",
                self.node,
                caps.kvm.error,
            )

    def renew_lease(self) -> None:
        name = agent_lease_name(self.node)
        now = micro_time(datetime.now(UTC))
        spec = {
            "holderIdentity": self.node,
            "leaseDurationSeconds": self.lease_duration,
            "renewTime": now,
        }
        lease = self.kube.get_lease(self.namespace, name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": now},
            }
            if self.kube.create_lease(self.namespace, body):
                return
            lease = self.kube.get_lease(self.namespace, name)
            if lease is None:
                return
        lease["spec"] = {**(lease.get("spec") or {}), **spec}
        self.kube.replace_lease(self.namespace, name, lease)
