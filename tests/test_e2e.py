"""End to end: `kubectl apply` of the 2-node example on a real control plane with 3 simulated
nodes (agents in their own network namespaces) and the operator; the guest spans two nodes
and gives the right answer; deletion leaves nothing behind."""

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, Cluster
from k8s_sim import ensure_namespace, wait_for
from spanvm.api.constants import SYSTEM_NAMESPACE
from spanvm.devcluster.nodes import SimulatedNodes
from spanvm.devcluster.operator_proc import operator_command, start, stop
from spanvm.kube import Kube
from spanvm.vmm.expected import smp_sum

pytestmark = [pytest.mark.cluster, pytest.mark.kvm]
EXAMPLE = REPO / "examples" / "spanningvm-2node.yaml"
NS = "e2e"


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_apply_runs_a_guest_spanning_two_nodes_and_delete_cleans_up(
    crds: Cluster, tmp_path: Path
) -> None:
    kube = Kube.connect(str(crds.kubeconfig))
    ensure_namespace(kube, SYSTEM_NAMESPACE)
    ensure_namespace(kube, NS)
    namespaces_before = netns_names()
    nodes = SimulatedNodes(
        kube,
        crds.kubeconfig,
        crds.plane.ports.apiserver,
        ["e2e-1", "e2e-2", "e2e-3"],
        tmp_path,
        system_namespace=SYSTEM_NAMESPACE,
    )
    manifest = yaml.safe_load(EXAMPLE.read_text())
    name, arg = manifest["metadata"]["name"], manifest["spec"]["boot"]["payload"]["arg"]
    operator = None
    try:
        nodes.up()
        operator = start(
            operator_command(
                crds.kubeconfig,
                system_namespace=SYSTEM_NAMESPACE,
                lease_name="e2e-operator",
                namespaces=(NS,),
            ),
            tmp_path / "operator.log",
        )
        nodes.wait_kvm_labelled()
        crds.kubectl("apply", "-n", NS, "-f", str(EXAMPLE))
        vm = wait_for(
            "the guest to finish",
            lambda: (
                (v := kube.get_vm(NS, name))
                and (v.get("status") or {}).get("phase") in ("Succeeded", "Failed")
                and v
            ),
            timeout=180,
        )
        status = vm["status"]
        assert status["phase"] == "Succeeded", status
        assert f"sum={smp_sum(arg)}" in status["consoleTail"]
        placed = [f["nodeName"] for f in status["fragments"]]
        assert len(set(placed)) == 2 and set(placed) <= set(nodes.names)
        assert [f["vcpuIds"] for f in status["fragments"]] == [[0], [1]]
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Scheduled"]["status"] == "True"
        assert conditions["Ready"]["reason"] == "Succeeded"
        fragments = kube.list_fragments(NS, f"spanvm.io/vm={name}")
        assert {f["status"]["phase"] for f in fragments} == {"Succeeded"}
        endpoints = {f["status"]["endpoint"].rsplit(":", 1)[0] for f in fragments}
        assert endpoints == {nodes.address_of(n) for n in placed}  # fabric crossed namespaces
        header, row = crds.kubectl("get", "svm", "-n", NS, name).stdout.splitlines()
        columns = dict(zip(header.split(), row.split(), strict=True))
        assert columns["PHASE"] == "Succeeded" and columns["NODES"] == ",".join(placed)

        # GitOps: with the operator's finalizer, annotations and status in place, the same
        # manifest applies as a no-op and shows no diff (no defaulting drift)
        again = crds.kubectl("apply", "-n", NS, "-f", str(EXAMPLE)).stdout
        assert "unchanged" in again
        diff = crds.kubectl("diff", "-n", NS, "-f", str(EXAMPLE), check=False)
        assert diff.returncode == 0, diff.stdout + diff.stderr

        crds.kubectl("delete", "-n", NS, "-f", str(EXAMPLE), "--wait=true", "--timeout=60s")
        assert kube.get_vm(NS, name) is None  # the finalizer was released
        wait_for("fragments gone", lambda: kube.list_fragments(NS) == [])
        wait_for(
            "agents to drop the fragments' state",
            lambda: not any(nodes.state_dir.glob("*/*/pids.json")),
        )
    finally:
        if operator is not None:
            stop(operator)
        for node in nodes.names:
            print(f"--- agent {node}:\n{nodes.log_of(node).read_text()[-2000:]}")
        print((tmp_path / "operator.log").read_text()[-3000:])
        nodes.down()
    assert processes_mentioning(str(tmp_path)) == []  # no runner, fragment or agent left
    assert netns_names() == namespaces_before
    assert all(kube.get_node(n) is None for n in nodes.names)
