"""End to end: `kubectl apply` of the 2-node example on a real control plane with 3 simulated
nodes (agents in their own network namespaces) and the operator; the guest spans two nodes
and gives the right answer; deletion leaves nothing behind."""

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, Cluster
from k8s_sim import ensure_namespace, free_port, wait_for
from spanvm.api.constants import SYSTEM_NAMESPACE
from spanvm.devcluster.nodes import SimulatedNodes
from spanvm.devcluster.operator_proc import operator_command, start, stop
from spanvm.kube import JsonObject, Kube
from spanvm.vmm.expected import smp_sum
from spanvm_cli import cli_env, spanvm

pytestmark = [pytest.mark.cluster, pytest.mark.kvm]
EXAMPLE = REPO / "examples" / "spanningvm-2node.yaml"
NS = "e2e"
AGENT_METRICS_PORT = 9641  # each agent in its own network namespace: one port for all


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


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def agent_endpoint(nodes: SimulatedNodes, node: str, path: str) -> str:
    """GET an agent's endpoint from inside its node's network namespace."""
    fetch = (
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
        f"'http://127.0.0.1:{AGENT_METRICS_PORT}{path}', timeout=10).read().decode())"
    )
    return subprocess.run(
        ["ip", "netns", "exec", nodes.namespace_of(node), sys.executable, "-c", fetch],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def one(family: Any, suffix: str = "", **labels: str) -> float:
    """The value of the one sample of `family` (name ending in `suffix`) with these labels."""
    found = [
        s.value
        for s in family.samples
        if s.name.endswith(suffix) and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, (family.name, labels, family.samples)
    return float(found[0])


def check_agent_metrics(nodes: SimulatedNodes, name: str, placed: list[str]) -> None:
    """Each agent running a fragment of the VM reports it: phase, vCPUs, fabric counters and
    the remote fault latency histogram, with the types Prometheus expects."""
    assert agent_endpoint(nodes, placed[0], "/healthz").startswith("agent on")
    pages_in = remote = 0.0
    for index, node in enumerate(placed):
        found = families(agent_endpoint(nodes, node, "/metrics"))
        assert not [s for f in found.values() for s in f.samples if s.name.endswith("_created")]
        assert found["spanvm_build_info"].samples[0].value == 1
        assert found["spanvm_agent_kvm_usable"].samples[0].value == 1
        mine = {"vm": name, "fragment": str(index)}
        phase = found["spanvm_fragment_phase"]
        assert phase.type == "gauge"
        assert one(phase, **mine, phase="Succeeded") == 1
        assert one(phase, **mine) == 1  # no other phase reported for it
        assert one(found["spanvm_fragment_vcpus"], **mine) == 1
        faults = found["spanvm_fragment_page_faults"]
        assert faults.type == "counter"
        assert one(faults, **mine) > 0
        moved = found["spanvm_fragment_fabric_pages"]
        bytes_moved = found["spanvm_fragment_fabric_bytes"]
        for direction in ("in", "out"):
            count = one(moved, **mine, direction=direction)
            assert one(bytes_moved, **mine, direction=direction) == count * 4096
        pages_in += one(moved, **mine, direction="in")
        assert found["spanvm_fragment_invalidations"].type == "counter"
        latency = found["spanvm_fragment_remote_fault_seconds"]
        assert latency.type == "histogram"
        buckets = [
            s.value
            for s in latency.samples
            if s.name.endswith("_bucket") and mine.items() <= s.labels.items()
        ]
        assert buckets == sorted(buckets) and len(buckets) == 11  # cumulative, +Inf last
        count = one(latency, "_count", **mine)
        assert count == buckets[-1]
        remote += count
    assert pages_in > 0 and remote > 0  # the guest's memory crossed the fabric


def check_operator_metrics(port: int, name: str, nodes: list[str]) -> None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = families(text)
    assert not [s for f in found.values() for s in f.samples if s.name.endswith("_created")]
    assert found["spanvm_operator_leader"].samples[0].value == 1
    by_phase = {s.labels["phase"]: s.value for s in found["spanvm_vms"].samples}
    assert by_phase["Succeeded"] == 1 and by_phase["Running"] == 0, by_phase
    vm = [s for s in found["spanvm_vm_phase"].samples if s.labels["vm"] == name]
    assert [s.labels["phase"] for s in vm] == ["Succeeded"]
    assert found["spanvm_vms_pending"].samples[0].value == 0
    assert found["spanvm_nodes_kvm"].samples[0].value >= len(nodes)
    fresh = {s.labels["node"]: s.value for s in found["spanvm_agent_heartbeat_fresh"].samples}
    assert all(fresh[n] == 1 for n in nodes), fresh
    assert found["spanvm_placements"].type == "counter"


@contextmanager
def running_cluster(
    crds: Cluster, tmp_path: Path, names: list[str], metrics_port: int | None = None
) -> Iterator[SimulatedNodes]:
    """Simulated nodes (an agent each, in its own network namespace, serving metrics) and
    the operator, both up and KVM labelled; afterwards logs shown, and nothing left: no
    process, no network namespace, no Node."""
    kube = Kube.connect(str(crds.kubeconfig))
    ensure_namespace(kube, SYSTEM_NAMESPACE)
    ensure_namespace(kube, NS)
    namespaces_before = netns_names()
    nodes = SimulatedNodes(
        kube,
        crds.kubeconfig,
        crds.plane.ports.apiserver,
        names,
        tmp_path,
        system_namespace=SYSTEM_NAMESPACE,
        agent_args=("--metrics-port", str(AGENT_METRICS_PORT)),
    )
    operator = None
    try:
        nodes.up()
        operator = start(
            operator_command(
                crds.kubeconfig,
                system_namespace=SYSTEM_NAMESPACE,
                lease_name="e2e-operator",
                namespaces=(NS,),
                metrics_port=metrics_port,
            ),
            tmp_path / "operator.log",
        )
        nodes.wait_kvm_labelled()
        yield nodes
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


def test_apply_runs_a_guest_spanning_two_nodes_and_delete_cleans_up(
    crds: Cluster, tmp_path: Path
) -> None:
    kube = Kube.connect(str(crds.kubeconfig))
    metrics_port = free_port()
    manifest = yaml.safe_load(EXAMPLE.read_text())
    name, arg = manifest["metadata"]["name"], manifest["spec"]["boot"]["payload"]["arg"]
    with running_cluster(crds, tmp_path, ["e2e-1", "e2e-2", "e2e-3"], metrics_port) as nodes:
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
        assert conditions["Ready"]["reason"] == "GuestFinished"
        fragments = kube.list_fragments(NS, f"spanvm.io/vm={name}")
        assert {f["status"]["phase"] for f in fragments} == {"Succeeded"}
        endpoints = {f["status"]["endpoint"].rsplit(":", 1)[0] for f in fragments}
        assert endpoints == {nodes.address_of(n) for n in placed}  # fabric crossed namespaces
        header, row = crds.kubectl("get", "svm", "-n", NS, name).stdout.splitlines()
        columns = dict(zip(header.split(), row.split(), strict=True))
        assert columns["STATUS"] == "Succeeded" and columns["NODES"] == ",".join(placed)
        assert columns["READY"] == "False" and columns["FRAGMENTS"] == "2"

        # Prometheus's view of the same run: both endpoints, names, types and values
        check_agent_metrics(nodes, name, placed)
        check_operator_metrics(metrics_port, name, nodes.names)

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


def test_a_kubevirt_user_stops_starts_follows_pauses_and_restarts_the_vm(
    crds: Cluster, tmp_path: Path
) -> None:
    """The daily verbs with commands a KubeVirt user would guess, against real agents and
    KVM: wait for it, follow its console, pause and unpause it, restart it, stop it, start
    it, and see why at each step (printableStatus, the Ready reason, Events)."""
    kube = Kube.connect(str(crds.kubeconfig))
    name = "verbs"
    manifest = {
        "apiVersion": "spanvm.io/v1alpha1",
        "kind": "SpanningVM",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "cpu": {"vcpus": 2},
            "memory": "64Mi",
            "boot": {"payload": {"name": "console-remote", "arg": 1_000_000_000}},
            "placement": {"maxFragments": 2},
            "runStrategy": "Always",
        },
    }

    def cli(*args: str, timeout: float = 120) -> str:
        result = spanvm(*args, "-n", NS, kubeconfig=crds.kubeconfig, timeout=timeout)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def status() -> JsonObject:
        return (kube.get_vm(NS, name) or {}).get("status") or {}

    def console_bytes() -> int:
        return int(status().get("consoleBytes") or 0)

    with running_cluster(crds, tmp_path, ["e2e-v1", "e2e-v2"]) as nodes:
        crds.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
        cli("wait", name, "--for=status=Running", "--timeout=3m", timeout=240)
        assert "GuestRunning" in cli("status", name)

        follower = subprocess.Popen(
            [sys.executable, "-m", "spanvm.cli", "console", name, "-f", "-n", NS],
            stdout=subprocess.PIPE,
            text=True,
            env=cli_env(crds.kubeconfig),
        )
        try:
            assert follower.stdout is not None
            # console-remote's lines: 32 letters each, crossing the fabric before printing.
            # A tail may start mid-line and a later look may say what it skipped: three
            # whole lines among the first 50 are what is asked.
            lines: list[str] = []
            whole = 0
            while whole < 3 and len(lines) < 50:
                lines.append(follower.stdout.readline())
                whole += len(lines[-1]) == 33 and lines[-1].strip().isalpha()
        finally:
            follower.terminate()
            follower.wait(30)
        assert whole == 3, lines

        def explained(i: int) -> bool:  # the follower's own cuts: a tail that starts mid-line,
            line, marker = lines[i], "[... "  # and around "[... N bytes not shown ...]"
            near = [lines[j] for j in (i - 1, i + 1) if 0 <= j < len(lines)]
            return (
                (len(line) == 33 and line.strip().isalpha())
                or i == 0
                or line.strip() == ""
                or line.startswith(marker)
                or any(n.startswith(marker) for n in near)
            )

        assert all(explained(i) for i in range(len(lines))), lines

        cli("pause", name)
        cli("wait", name, "--for=status=Paused", "--timeout=60s")
        time.sleep(3)  # what was in flight when the vCPUs stopped has been reported
        held = console_bytes()
        time.sleep(4)
        assert console_bytes() == held and status()["phase"] == "Running"
        cli("unpause", name)
        cli("wait", name, "--for=status=Running", "--timeout=60s")
        wait_for("the guest to go on", lambda: console_bytes() > held)

        cli("restart", name)
        wait_for("a restart", lambda: status().get("restarts") == 1, timeout=60)
        cli("wait", name, "--for=status=Running", "--timeout=2m", timeout=180)

        assert "runStrategy Always -> Halted" in cli("stop", name)
        cli("wait", name, "--for=status=Stopped", "--timeout=2m", timeout=180)
        stopped = status()
        assert "fragmentCount" not in stopped and "nodes" not in stopped
        ready = next(c for c in stopped["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "Halted" and ready["status"] == "False"
        wait_for("fragments gone", lambda: kube.list_fragments(NS) == [])

        assert "runStrategy Halted -> Always" in cli("start", name)
        cli("wait", name, "--for=status=Running", "--timeout=3m", timeout=240)
        reasons = {e.reason for e in kube.core.list_namespaced_event(NS).items}
        assert {"RestartRequested", "Running", "FabricConnected", "Paused"} <= reasons, reasons

        crds.kubectl("delete", "svm", name, "-n", NS, "--wait=true", "--timeout=60s")
        wait_for("fragments gone", lambda: kube.list_fragments(NS) == [])
        wait_for(
            "agents to drop the fragments' state",
            lambda: not any(nodes.state_dir.glob("*/*/pids.json")),
        )
