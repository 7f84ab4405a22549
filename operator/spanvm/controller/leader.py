"""Leader election on a coordination.k8s.io Lease: only the holder runs the handlers, so two
operator replicas never place the same VM twice. Optimistic concurrency (resourceVersion)
decides races; an expired Lease may be taken over."""

import logging
from datetime import UTC, datetime, timedelta

from spanvm.kube import JsonObject, Kube
from spanvm.rfc3339 import micro_time, parse_time

log = logging.getLogger("spanvm.operator.leader")


class LeaderLease:
    """One replica's claim on the operator Lease."""

    def __init__(
        self, kube: Kube, namespace: str, name: str, identity: str, *, duration: int = 15
    ) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.identity, self.duration = identity, duration
        self.holder: str | None = None

    def _spec(self, previous: JsonObject | None, now: datetime) -> JsonObject:
        spec = dict(previous or {})
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = micro_time(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (
                1 if previous else 0
            )
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=self.duration,
            renewTime=micro_time(now),
        )
        return spec

    def try_acquire(self) -> bool:
        """Acquire or renew; True while this replica holds the Lease."""
        now = datetime.now(UTC)
        lease = self.kube.get_lease(self.namespace, self.name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(None, now),
            }
            won = self.kube.create_lease(self.namespace, body)
            self.holder = self.identity if won else None
            return won
        spec = lease.get("spec") or {}
        self.holder = spec.get("holderIdentity")
        renewed = parse_time(spec.get("renewTime"))
        duration = int(spec.get("leaseDurationSeconds") or self.duration)
        expired = renewed is None or renewed + timedelta(seconds=duration) < now
        if self.holder not in (None, "", self.identity) and not expired:
            return False
        lease["spec"] = self._spec(spec, now)
        won = self.kube.replace_lease(self.namespace, self.name, lease)
        if won:
            self.holder = self.identity
        return won

    def release(self) -> None:
        """Give the Lease up on a clean shutdown so another replica takes over at once."""
        lease = self.kube.get_lease(self.namespace, self.name)
        if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
            lease["spec"]["holderIdentity"] = None
            self.kube.replace_lease(self.namespace, self.name, lease)
            log.info("released the operator Lease %s/%s", self.namespace, self.name)
