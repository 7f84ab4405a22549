"""Simulated nodes for the local control plane: a Node object per node (Ready, as a kubelet
would leave it), a network namespace per node joined by a bridge, and the node's agent as a
host process inside its namespace, exactly as its DaemonSet pod would run. Used by the demo
and the end-to-end tests; `down()` removes every process, namespace and object it made."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from spanvm.api.constants import KVM_LABEL, agent_lease_name
from spanvm.devcluster.apirelay import ApiRelay
from spanvm.fabric.netns import NamespaceNet
from spanvm.kube import CONFLICT, NOT_FOUND, Kube, unless_status
from spanvm.rfc3339 import format_time


def register_node(kube: Kube, name: str, labels: dict[str, str] | None = None) -> None:
    """Create a Node object (as a kubelet registers itself), Ready and untainted."""
    body: Any = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels or {}},
    }
    unless_status(lambda: kube.core.create_node(body), CONFLICT)
    set_node_ready(kube, name, ready=True)


def set_node_ready(kube: Kube, name: str, *, ready: bool) -> None:
    """Write the Ready condition a kubelet would; clear the not-ready taint once Ready (what
    the node lifecycle controller does)."""
    now = format_time()
    condition = {
        "type": "Ready",
        "status": str(ready),
        "reason": "KubeletReady" if ready else "KubeletNotReady",
        "message": "simulated node",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }
    kube.core.patch_node_status(name, {"status": {"conditions": [condition]}})
    if ready:
        kube.core.patch_node(name, {"spec": {"taints": None}})


def delete_node(kube: Kube, name: str, system_namespace: str) -> None:
    """Remove a Node object and its agent's heartbeat Lease (either may be gone already)."""
    unless_status(lambda: kube.core.delete_node(name), NOT_FOUND)
    unless_status(
        lambda: kube.coordination.delete_namespaced_lease(agent_lease_name(name), system_namespace),
        NOT_FOUND,
    )


def kill_fragment_processes(state_dir: Path) -> int:
    """SIGKILL every runner and fragment process recorded under state_dir; how many."""
    killed = 0
    for pids_file in state_dir.glob("*/*/pids.json"):
        with suppress(OSError, ValueError):
            for pid in json.loads(pids_file.read_text()).values():
                with suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
                    killed += 1
    return killed


class SimulatedNodes:
    """Nodes `names`, each with its own network namespace and agent."""

    def __init__(
        self,
        kube: Kube,
        kubeconfig: Path,
        apiserver_port: int,
        names: list[str],
        work_dir: Path,
        *,
        system_namespace: str = "spanvm-system",
        guest_vcpus: int = 1,
        labels: dict[str, str] | None = None,
        agent_args: tuple[str, ...] = (),
    ) -> None:
        self.kube, self.kubeconfig, self.names = kube, kubeconfig, names
        self.agent_args = agent_args  # extra `spanvm agent` options for every node
        self.work_dir, self.system_namespace = work_dir, system_namespace
        self.guest_vcpus, self.labels = guest_vcpus, labels or {}
        self.net = NamespaceNet(len(names))
        self.relay = ApiRelay(apiserver_port)
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.state_dir = work_dir / "state"

    def namespace_of(self, node: str) -> str:
        return self.net.namespace(self.names.index(node))

    def address_of(self, node: str) -> str:
        return self.net.address(self.names.index(node))

    def log_of(self, node: str) -> Path:
        return self.work_dir / f"agent-{node}.log"

    def up(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.net.create()
        for node in self.names:
            self.relay.add(self.namespace_of(node))
            register_node(self.kube, node, self.labels)
            self.start_agent(node, *self.agent_args)

    def wait_kvm_labelled(self, timeout: float = 60.0) -> None:
        """Until every agent has found KVM and labelled its node (RuntimeError otherwise)."""
        deadline = time.monotonic() + timeout
        waiting = list(self.names)
        while waiting:
            waiting = [
                n
                for n in waiting
                if ((self.kube.get_node(n) or {}).get("metadata", {}).get("labels") or {}).get(
                    KVM_LABEL
                )
                != "true"
            ]
            if waiting and time.monotonic() > deadline:
                logs = ", ".join(str(self.log_of(n)) for n in waiting)
                raise RuntimeError(
                    f"agents on {waiting} did not label their nodes with {KVM_LABEL}=true"
                    f" within {timeout:.0f}s (see {logs})"
                )
            if waiting:
                time.sleep(0.3)

    def agent_command(self, node: str, *extra: str) -> list[str]:
        return [
            "ip",
            "netns",
            "exec",
            self.namespace_of(node),
            sys.executable,
            "-m",
            "spanvm.cli",
            "agent",
            "--node-name",
            node,
            "--kubeconfig",
            str(self.kubeconfig),
            "--system-namespace",
            self.system_namespace,
            "--fabric-address",
            self.address_of(node),
            "--state-dir",
            str(self.state_dir),
            "--guest-vcpus",
            str(self.guest_vcpus),
            "--lease-duration",
            "6",
            "--renew-interval",
            "1",
            "--capability-interval",
            "3",
            *extra,
        ]

    def start_agent(self, node: str, *extra: str) -> subprocess.Popen[bytes]:
        with self.log_of(node).open("ab") as log:
            process = subprocess.Popen(
                self.agent_command(node, *extra), stdout=log, stderr=subprocess.STDOUT
            )
        self.agents[node] = process
        return process

    def stop_agent(self, node: str, *, kill: bool = False) -> None:
        process = self.agents.pop(node, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def down(self) -> None:
        for node in list(self.agents):
            self.stop_agent(node)
        kill_fragment_processes(self.state_dir)
        time.sleep(0.2)
        self.relay.close()
        self.net.destroy()
        for node in self.names:
            delete_node(self.kube, node, self.system_namespace)
