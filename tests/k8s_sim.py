"""Test helpers on the real API server: Node objects and heartbeat Leases standing in for
kubelets and agents, operator processes, and polling with a message that says what was
awaited."""

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from spanvm.api.constants import (
    ALLOCATABLE_MEMORY_ANNOTATION,
    ALLOCATABLE_VCPUS_ANNOTATION,
    GROUP,
    KVM_LABEL,
    SPANNINGVM_PLURAL,
    VERSION,
    agent_lease_name,
)
from spanvm.devcluster.nodes import delete_node, register_node, set_node_ready
from spanvm.devcluster.operator_proc import operator_command, start, stop
from spanvm.kube import CONFLICT, NOT_FOUND, JsonObject, Kube, unless_status
from spanvm.rfc3339 import micro_time

T = TypeVar("T")
SYSTEM_NS = "spanvm-system"


def wait_for(
    what: str, check: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.2
) -> T:
    """Poll check() until it returns something truthy; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_namespace(kube: Kube, name: str) -> None:
    unless_status(lambda: kube.core.create_namespace({"metadata": {"name": name}}), CONFLICT)


def force_delete_vms(kube: Kube, namespace: str) -> None:
    """Remove every SpanningVM and VMFragment of a namespace, finalizers or not."""
    unfinalize = {"metadata": {"finalizers": None}}
    for vm in kube.list_vms(namespace):
        name = vm["metadata"]["name"]
        unless_status(
            lambda n=name: kube.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, SPANNINGVM_PLURAL, n, unfinalize
            ),
            NOT_FOUND,
        )
        unless_status(
            lambda n=name: kube.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, SPANNINGVM_PLURAL, n
            ),
            NOT_FOUND,
        )
    for frag in kube.list_fragments(namespace):
        kube.delete_fragment(namespace, frag["metadata"]["name"])


class SimNodes:
    """Node objects as kubelets and agents would leave them, and their heartbeat Leases."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.names: list[str] = []
        ensure_namespace(kube, SYSTEM_NS)

    def add(
        self,
        name: str,
        vcpus: int = 1,
        memory: str = "4Gi",
        labels: dict[str, str] | None = None,
        *,
        ready: bool = True,
        kvm: bool = True,
    ) -> None:
        register_node(self.kube, name, {KVM_LABEL: str(kvm).lower(), **(labels or {})})
        self.kube.patch_node_metadata(
            name,
            {},
            {ALLOCATABLE_VCPUS_ANNOTATION: str(vcpus), ALLOCATABLE_MEMORY_ANNOTATION: memory},
        )
        self.names.append(name)
        if not ready:
            self.set_ready(name, False)
        self.heartbeat(name)

    def set_ready(self, name: str, ready: bool) -> None:
        set_node_ready(self.kube, name, ready=ready)

    def heartbeat(self, name: str, *, age: float = 0.0, duration: int = 3600) -> None:
        """Write the agent's Lease as renewed `age` seconds ago."""
        renewed = micro_time(datetime.now(UTC) - timedelta(seconds=age))
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": agent_lease_name(name), "namespace": SYSTEM_NS},
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": duration,
                "renewTime": renewed,
            },
        }
        if not self.kube.create_lease(SYSTEM_NS, lease):
            self.kube.coordination.patch_namespaced_lease(
                agent_lease_name(name), SYSTEM_NS, {"spec": lease["spec"]}
            )

    def expire(self, name: str) -> None:
        """The agent's last renewal: the operator sees no change after this, so the Lease
        lapses one (short) duration later by the operator's own clock."""
        self.heartbeat(name, age=120, duration=2)

    def delete_all(self) -> None:
        for name in self.names:
            delete_node(self.kube, name, SYSTEM_NS)
        self.names.clear()


@contextmanager
def operator_process(
    kubeconfig: Path,
    namespace: str,
    log_path: Path,
    *,
    lease_name: str,
    crash_after_creates: int | None = None,
    deletion_grace: float = 4.0,
    node_loss_grace: float = 3.0,
    restart_backoff: float = 2.0,
    metrics_port: int | None = None,
    pod_name: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`spanvm operator` watching one namespace; stopped (SIGTERM, then SIGKILL) after.
    `crash_after_creates`: the operator exits after that many fragment creates (its fault
    hook, through tests/faulty_operator.py). `pod_name`: POD_NAME as the chart sets it."""
    command = operator_command(
        kubeconfig,
        system_namespace=SYSTEM_NS,
        lease_name=lease_name,
        namespaces=(namespace,),
        deletion_grace=deletion_grace,
        node_loss_grace=node_loss_grace,
        restart_backoff=restart_backoff,
        metrics_port=metrics_port,
    )
    if crash_after_creates is not None:
        faulty = Path(__file__).with_name("faulty_operator.py")
        command = [sys.executable, str(faulty), str(crash_after_creates), *command[3:]]
    process = start(command, log_path, {"POD_NAME": pod_name} if pod_name else None)
    try:
        yield process
    finally:
        stop(process)


def vm_manifest(
    name: str,
    namespace: str,
    pool: str,
    *,
    vcpus: int = 2,
    memory: str = "256Mi",
    max_fragments: int | None = 2,
    run_strategy: str = "Once",
    payload: str = "smp-sum",
    arg: int | None = None,
) -> JsonObject:
    placement: JsonObject = {"nodeSelector": {"pool": pool}}
    if max_fragments is not None:
        placement["maxFragments"] = max_fragments
    boot: JsonObject = {"payload": {"name": payload}}
    if arg is not None:
        boot["payload"]["arg"] = arg
    return {
        "apiVersion": "spanvm.io/v1alpha1",
        "kind": "SpanningVM",
        "metadata": {"name": name, "namespace": namespace, "labels": {"team": "tests"}},
        "spec": {
            "cpu": {"vcpus": vcpus},
            "memory": memory,
            "boot": boot,
            "placement": placement,
            "runStrategy": run_strategy,
        },
    }
