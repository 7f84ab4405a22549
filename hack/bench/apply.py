#!/usr/bin/env python3
"""Control-plane benchmark: `kubectl apply` of a SpanningVM -> every VMFragment created.

On the local control plane (started if needed) with the operator running and 4 stand-in
nodes (Node objects with fresh heartbeat Leases; no agents, so nothing runs). The baseline in
the same run is `kubectl apply` of a ConfigMap until a GET sees it: the API round trip the
operator's placement adds to. Prints p50/p90 and the ratio of the p50s.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from spanvm.api.constants import (
    ALLOCATABLE_MEMORY_ANNOTATION,
    ALLOCATABLE_VCPUS_ANNOTATION,
    KVM_LABEL,
    SYSTEM_NAMESPACE,
    agent_lease_name,
)
from spanvm.devcluster.controlplane import ControlPlane
from spanvm.devcluster.nodes import delete_node, register_node
from spanvm.devcluster.operator_proc import operator_command, start, stop
from spanvm.devcluster.paths import cache_dir, kubectl, repo_root
from spanvm.kube import Kube
from spanvm.rfc3339 import micro_time

NS, ROUNDS = "bench-apply", 20
NODES = [f"bench-node-{i}" for i in range(4)]


def run_kubectl(plane: ControlPlane, *args: str, stdin: str | None = None) -> None:
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
    subprocess.run([kubectl(), *args], input=stdin, text=True, env=env, check=True,
                   capture_output=True)  # fmt: skip


def timed_until(action: object, done: object, timeout: float = 30.0) -> float:
    started = time.perf_counter()
    action()  # type: ignore[operator]
    while not done():  # type: ignore[operator]
        if time.perf_counter() - started > timeout:
            raise RuntimeError("timed out")
        time.sleep(0.01)
    return time.perf_counter() - started


def vm(name: str) -> str:
    return json.dumps({
        "apiVersion": "spanvm.io/v1alpha1", "kind": "SpanningVM",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"cpu": {"vcpus": 12}, "memory": "256Mi",
                 "boot": {"payload": {"name": "smp-sum"}},
                 "placement": {"nodeSelector": {"pool": "bench"}, "maxFragments": 2}},
    })  # fmt: skip


def main() -> int:
    plane = ControlPlane(cache_dir() / "cluster")
    plane.up()
    kube = Kube.connect(str(plane.kubeconfig))
    run_kubectl(plane, "apply", "-f", str(repo_root() / "crds"))
    for ns in (NS, SYSTEM_NAMESPACE):
        subprocess.run([kubectl(), "--kubeconfig", str(plane.kubeconfig), "create", "ns", ns],
                       capture_output=True, check=False)  # fmt: skip
    for node in NODES:
        register_node(kube, node, {KVM_LABEL: "true", "pool": "bench"})
        kube.patch_node_metadata(
            node, {}, {ALLOCATABLE_VCPUS_ANNOTATION: "8", ALLOCATABLE_MEMORY_ANNOTATION: "64Gi"}
        )
        kube.create_lease(SYSTEM_NAMESPACE, {
            "metadata": {"name": agent_lease_name(node), "namespace": SYSTEM_NAMESPACE},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": 3600,
                     "renewTime": micro_time(datetime.now(UTC))},
        })  # fmt: skip
    log = Path(tempfile.mkdtemp()) / "operator.log"
    operator = start(
        operator_command(plane.kubeconfig, system_namespace=SYSTEM_NAMESPACE,
                         lease_name="bench-operator", namespaces=(NS,), timer_interval=30),
        log,
    )  # fmt: skip
    try:
        time.sleep(3)  # operator start-up (Kopf, Lease)
        svm, baseline = [], []
        for i in range(ROUNDS):
            name = f"b{i}"
            baseline.append(timed_until(
                lambda n=name: run_kubectl(plane, "apply", "-f", "-", stdin=json.dumps({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": n, "namespace": NS}, "data": {"k": "v"}})),
                lambda n=name: _exists(kube, n),
            ))  # fmt: skip
            svm.append(timed_until(
                lambda n=name: run_kubectl(plane, "apply", "-f", "-", stdin=vm(n)),
                lambda n=name: len(kube.list_fragments(NS, f"spanvm.io/vm={n}")) == 2,
            ))  # fmt: skip
            run_kubectl(plane, "delete", "svm", name, "-n", NS, "--wait=false")
            for frag in kube.list_fragments(NS, f"spanvm.io/vm={name}"):
                kube.patch_fragment_status(NS, frag["metadata"]["name"], {"phase": "Stopped"})
        base_p50, svm_p50 = statistics.median(baseline), statistics.median(svm)
        q = statistics.quantiles
        print(f"{'what':<44} {'p50 ms':>8} {'p90 ms':>8}")
        print(f"{'kubectl apply ConfigMap -> visible':<44} {base_p50 * 1000:>8.0f}"
              f" {q(baseline, n=10)[-1] * 1000:>8.0f}")  # fmt: skip
        print(f"{'kubectl apply SpanningVM -> 2 fragments':<44} {svm_p50 * 1000:>8.0f}"
              f" {q(svm, n=10)[-1] * 1000:>8.0f}")  # fmt: skip
        print(f"ratio (SpanningVM / baseline p50): {svm_p50 / base_p50:.2f}  ({ROUNDS} rounds)")
    finally:
        stop(operator)
        run_kubectl(plane, "delete", "ns", NS, "--wait=false")
        for node in NODES:
            delete_node(kube, node, SYSTEM_NAMESPACE)
    return 0


def _exists(kube: Kube, name: str) -> bool:
    try:
        kube.core.read_namespaced_config_map(name, NS)
    except Exception:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
