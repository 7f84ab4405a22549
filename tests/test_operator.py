"""The operator against the real API server: nodes are Node objects written by the tests and
agents are stood in for by writing VMFragment status as an agent would."""

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from conftest import Cluster
from k8s_sim import (
    SYSTEM_NS,
    SimNodes,
    ensure_namespace,
    force_delete_vms,
    operator_process,
    vm_manifest,
    wait_for,
)
from spanvm.agent.controller import Agent
from spanvm.agent.node_publisher import NodePublisher, Offer
from spanvm.api.constants import (
    FINALIZER,
    GROUP,
    SPANNINGVM_PLURAL,
    VERSION,
    VM_LABEL,
    agent_lease_name,
    fabric_secret_name,
    label_value,
)
from spanvm.api.spanningvm import FragmentSummary, SpanningVMSpec
from spanvm.controller.fragments import fragment_body
from spanvm.kube import NOT_FOUND, JsonObject, Kube, unless_status
from spanvm.sealing import load_or_create
from spanvm_cli import spanvm

pytestmark = pytest.mark.cluster
NS = "op-test"
GRACE = 8.0  # the module operator's --node-loss-grace
MiB = 1 << 20
BACKOFF = 3.0  # its --restart-backoff
POD_NAME = "spanvm-operator-7d9f-test"  # its POD_NAME, as the chart's downward API sets it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Env:
    """A namespace watched by a running operator, and the nodes of the current test."""

    kube: Kube
    cluster: Cluster
    nodes: SimNodes
    namespace: str
    log: Path
    metrics_port: int

    def create_vm(self, body: JsonObject) -> None:
        self.kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, body["metadata"]["namespace"], SPANNINGVM_PLURAL, body
        )

    def vm(self, name: str, namespace: str | None = None) -> JsonObject | None:
        return self.kube.get_vm(namespace or self.namespace, name)

    def status(self, name: str) -> JsonObject:
        vm = self.vm(name)
        return (vm or {}).get("status") or {}

    def fragments(self, name: str, namespace: str | None = None) -> list[JsonObject]:
        items = self.kube.list_fragments(
            namespace or self.namespace, f"{VM_LABEL}={label_value(name)}"
        )
        return sorted(items, key=lambda f: int(f["spec"]["index"]))

    def wait_phase(self, name: str, phase: str, timeout: float = 30) -> JsonObject:
        return wait_for(
            f"{name} in phase {phase}",
            lambda: self.status(name) if self.status(name).get("phase") == phase else None,
            timeout,
        )

    def report(self, fragment: JsonObject, **status: Any) -> None:
        """What the fragment's agent would write."""
        meta = fragment["metadata"]
        self.kube.patch_fragment_status(meta["namespace"], meta["name"], status)

    def delete_vm(self, name: str) -> None:
        self.kube.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, SPANNINGVM_PLURAL, name
        )

    def events(self, name: str) -> list[str]:
        items = self.kube.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        ).items
        return [f"{e.reason}: {e.message}" for e in items]


def condition(status: JsonObject, type_: str) -> JsonObject:
    return next(c for c in status.get("conditions") or [] if c["type"] == type_)


def reason_of(status: JsonObject, type_: str) -> str | None:
    """The reason of a condition, None while it is not set."""
    found = [c for c in status.get("conditions") or [] if c["type"] == type_]
    return found[0].get("reason") if found else None


def wait_for_ready_reason(env: Env, name: str, reason: str) -> JsonObject:
    """The VM's status once its Ready condition gives `reason`."""

    def ready() -> JsonObject | None:
        status = env.status(name)
        return status if reason_of(status, "Ready") == reason else None

    return wait_for(f"{name} Ready={reason}", ready)


@pytest.fixture(scope="module")
def kube(crds: Cluster) -> Kube:
    return Kube.connect(str(crds.kubeconfig))


@pytest.fixture(scope="module")
def running_operator(
    kube: Kube, crds: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, int]]:
    ensure_namespace(kube, NS)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    port = free_port()
    with operator_process(
        crds.kubeconfig,
        NS,
        log,
        lease_name="op-test",
        metrics_port=port,
        node_loss_grace=GRACE,
        restart_backoff=BACKOFF,
        pod_name=POD_NAME,
    ) as process:
        yield log, port
        assert process.poll() is None, log.read_text()[-3000:]


@pytest.fixture
def env(kube: Kube, crds: Cluster, running_operator: tuple[Path, int]) -> Iterator[Env]:
    nodes = SimNodes(kube)
    log, port = running_operator
    try:
        yield Env(kube, crds, nodes, NS, log, port)
    finally:
        print("operator log tail:\n" + log.read_text()[-4000:])
        force_delete_vms(kube, NS)
        nodes.delete_all()


@contextmanager
def own_namespace(kube: Kube, crds: Cluster, ns: str, tmp_path: Path) -> Iterator[Env]:
    """A namespace and nodes for a test that runs its own operator(s); logs shown, all removed."""
    ensure_namespace(kube, ns)
    nodes = SimNodes(kube)
    try:
        yield Env(kube, crds, nodes, ns, tmp_path / "op.log", 0)
    finally:
        for log in tmp_path.glob("*.log"):
            print(f"{log.name}:\n{log.read_text()[-3000:]}")
        force_delete_vms(kube, ns)
        nodes.delete_all()


def placed_whole(env: Env, name: str, namespace: str) -> bool:
    count = (env.kube.get_vm(namespace, name) or {}).get("status", {}).get("fragmentCount")
    return bool(count) and len(env.fragments(name, namespace)) == count


def running_vm(env: Env, name: str, pool: str) -> list[JsonObject]:
    """Two 1-vCPU nodes in `pool` and a 2-vCPU VM placed on them, its fragments Running."""
    env.nodes.add(f"{pool}-a", labels={"pool": pool})
    env.nodes.add(f"{pool}-b", labels={"pool": pool})
    env.create_vm(vm_manifest(name, NS, pool))
    frags = run_fragments(env, name)
    env.wait_phase(name, "Running")
    return frags


def run_fragments(env: Env, name: str) -> list[JsonObject]:
    """Stand-in agents start every fragment in index order, as the fabric requires."""
    frags = wait_for(f"2 fragments of {name}", lambda: len(env.fragments(name)) == 2 or None)
    frags = env.fragments(name)
    for i, frag in enumerate(frags):
        env.report(frag, phase="Running", endpoint=f"10.0.0.{i + 1}:7000", pid=100 + i)
    return frags


def test_create_places_fragments_and_status_follows_them(env: Env) -> None:
    env.nodes.add("p1-a", vcpus=4, memory="4Gi", labels={"pool": "p1"})
    env.nodes.add("p1-b", vcpus=4, memory="4Gi", labels={"pool": "p1"})
    env.nodes.add("p1-small", vcpus=2, memory="1Gi", labels={"pool": "p1"})
    env.nodes.add("p1-nokvm", vcpus=64, memory="64Gi", labels={"pool": "p1"}, kvm=False)
    env.create_vm(vm_manifest("vm1", NS, "p1", vcpus=6, memory="512Mi"))

    frags = wait_for(
        "2 fragments", lambda: env.fragments("vm1") if len(env.fragments("vm1")) == 2 else None
    )
    assert [f["spec"]["nodeName"] for f in frags] == ["p1-a", "p1-b"]
    assert [f["spec"]["vcpuIds"] for f in frags] == [[0, 1, 2], [3, 4, 5]]
    # each is home for its recorded share (256Mi) less, on fragment 0, the 2 MiB system area
    homes = [sum(r["size"] for r in f["spec"]["homeMemory"]) for f in frags]
    assert homes == [256 * MiB - 2 * MiB, 256 * MiB]
    vm = env.vm("vm1")
    assert vm is not None
    for f in frags:
        assert f["metadata"]["ownerReferences"][0]["uid"] == vm["metadata"]["uid"]
        assert f["metadata"]["labels"]["team"] == "tests"
        assert f["spec"]["secretRef"]["name"] == f"vm1-fabric-{vm['metadata']['uid'][:8]}"
        assert f["spec"]["boot"] == {"payload": {"name": "smp-sum"}}
    secret = env.kube.read_secret_key(NS, f"vm1-fabric-{vm['metadata']['uid'][:8]}", "fabric-key")
    assert secret is not None and len(secret) == 64

    # peers are filled once all are placed; endpoints appear as fragments report them
    frags = wait_for(
        "peers",
        lambda: all(f["spec"].get("peers") for f in env.fragments("vm1")) and env.fragments("vm1"),
    )
    assert [p["nodeName"] for p in frags[1]["spec"]["peers"]] == ["p1-a", "p1-b"]
    status = env.wait_phase("vm1", "Starting")  # peers are written just before the status
    assert condition(status, "Scheduled")["status"] == "True"
    assert condition(status, "Ready")["status"] == "False"

    env.report(frags[0], phase="Starting", endpoint="10.0.0.1:7000")
    wait_for(
        "fragment 1 to learn fragment 0's endpoint",
        lambda: env.fragments("vm1")[1]["spec"]["peers"][0].get("endpoint") == "10.0.0.1:7000",
    )
    run_fragments(env, "vm1")
    status = env.wait_phase("vm1", "Running")
    assert condition(status, "FabricReady")["status"] == "True"
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Ready")["observedGeneration"] == vm["metadata"]["generation"]
    assert status["nodes"] == "p1-a,p1-b"
    assert [f["phase"] for f in status["fragments"]] == ["Running", "Running"]

    frags = env.fragments("vm1")
    env.report(frags[1], phase="Succeeded", exitCode=0)
    env.report(frags[0], phase="Succeeded", exitCode=0, consoleTail="sum=42 ok\n")
    status = env.wait_phase("vm1", "Succeeded")
    assert status["exitCode"] == 0 and "sum=42" in status["consoleTail"]
    assert condition(status, "Ready")["status"] == "False"
    events = env.events("vm1")
    assert any(e.startswith("Scheduled: placed on p1-a") for e in events), events
    assert any(e.startswith("Succeeded:") for e in events), events

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics").read().decode()
    placements = [m for m in metrics.splitlines() if m.startswith("spanvm_placements_total ")]
    assert placements and float(placements[0].split()[1]) >= 1


def test_fragment_failure_fails_the_vm_with_the_reason(env: Env) -> None:
    frags = running_vm(env, "vm2", "p2")
    env.report(frags[1], phase="Failed", message="fragment VMM killed by SIGKILL")
    status = env.wait_phase("vm2", "Failed")
    assert "fragment 1 on p2-b failed: fragment VMM killed by SIGKILL" in status["message"]


def test_a_vm_is_scheduled_by_its_first_write_then_gets_the_finalizer(env: Env) -> None:
    """Placement first (docs/operator.md "Placements first"): the first change to a new
    SpanningVM is its placement; the operator's finalizer comes next, at the VM's turn to be
    materialised (not Kopf's, on the first event); the fragments come after the finalizer,
    so a deletion can never leave them behind."""
    env.nodes.add("p20-a", vcpus=4, labels={"pool": "p20"})
    # The operator learns of the node through its watch; a VM it meets first is rightly
    # written Unschedulable (seen in CI). A 1-vCPU probe in the pool, once placed, shows the
    # operator's cache holds the node (3 vCPUs stay free for vm20).
    env.create_vm(vm_manifest("vm20-probe", NS, "p20", vcpus=1, max_fragments=1))
    wait_for(
        "the probe placed",
        lambda: (
            reason_of(env.status("vm20-probe"), "Scheduled") is not None
            and condition(env.status("vm20-probe"), "Scheduled")["status"] == "True"
        ),
    )
    created: JsonObject = env.kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, SPANNINGVM_PLURAL, vm_manifest("vm20", NS, "p20", vcpus=2)
    )
    seen: list[JsonObject] = []
    for event in watch.Watch().stream(  # type: ignore[no-untyped-call]
        env.kube.custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        NS,
        SPANNINGVM_PLURAL,
        field_selector="metadata.name=vm20",
        resource_version=created["metadata"]["resourceVersion"],
        timeout_seconds=30,
    ):
        seen.append(event["object"])
        if len(seen) == 2:
            break
    placed, guarded = seen
    assert condition(placed["status"], "Scheduled")["status"] == "True"
    assert placed["status"]["fragments"][0]["nodeName"] == "p20-a"
    assert FINALIZER not in (placed["metadata"].get("finalizers") or [])
    assert guarded["metadata"]["finalizers"] == [FINALIZER]
    assert guarded["status"] == placed["status"]
    frags = wait_for("the fragment", lambda: env.fragments("vm20") or None)
    assert int(frags[0]["metadata"]["resourceVersion"]) > int(
        guarded["metadata"]["resourceVersion"]
    )


def test_unschedulable_stays_pending_then_placed_when_a_node_appears(env: Env) -> None:
    env.nodes.add("p3-a", vcpus=4, labels={"pool": "p3"})
    env.create_vm(vm_manifest("vm3", NS, "p3", vcpus=8))
    status = wait_for(
        "Pending with a reason", lambda: env.status("vm3").get("message") and env.status("vm3")
    )
    assert status["phase"] == "Pending"
    scheduled = condition(status, "Scheduled")
    assert scheduled["status"] == "False" and scheduled["reason"] == "Unschedulable"
    assert "needs 8 vCPUs" in scheduled["message"] and "maxFragments=2" in scheduled["message"]
    assert env.fragments("vm3") == []
    # Events are posted asynchronously (Kopf's poster queue): they may follow the status
    wait_for(
        "the Unschedulable Event", lambda: any("Unschedulable" in e for e in env.events("vm3"))
    )

    env.nodes.add("p3-b", vcpus=4, labels={"pool": "p3"})
    frags = wait_for(
        "placement after the node appeared",
        lambda: len(env.fragments("vm3")) == 2 and env.fragments("vm3"),
    )
    assert sorted(f["spec"]["nodeName"] for f in frags) == ["p3-a", "p3-b"]
    assert condition(env.status("vm3"), "Scheduled")["status"] == "True"


def test_a_vm_that_owns_nothing_has_no_finalizer_and_is_deleted_at_once(env: Env) -> None:
    """The operator's finalizer comes just before the VM owns something (docs/operator.md,
    "Placements first"): Kopf adds none of its own, so a Pending VM is never held by one and
    a deletion of it completes without the operator."""
    env.nodes.add("p21-a", vcpus=2, labels={"pool": "p21"})
    env.create_vm(vm_manifest("vm21", NS, "p21", vcpus=8))
    wait_for("Pending with a reason", lambda: env.status("vm21").get("message"))
    time.sleep(1.5)  # a periodic pass (the operator runs them every second here) came by
    pending = env.vm("vm21")
    assert pending is not None and not pending["metadata"].get("finalizers")
    env.kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, SPANNINGVM_PLURAL, "vm21")
    assert env.vm("vm21") is None  # gone as the delete returned: nothing waited for


def test_capacity_counts_other_vms_fragments(env: Env) -> None:
    env.nodes.add("p4-a", labels={"pool": "p4"})
    env.nodes.add("p4-b", labels={"pool": "p4"})
    env.create_vm(vm_manifest("vm4a", NS, "p4"))
    wait_for("first VM placed", lambda: len(env.fragments("vm4a")) == 2)
    env.create_vm(vm_manifest("vm4b", NS, "p4"))
    status = wait_for(
        "second VM Pending",
        lambda: env.status("vm4b").get("phase") == "Pending" and env.status("vm4b"),
    )
    assert "too full" in status["message"]
    env.delete_vm("vm4a")  # stand-in agents stop its fragments
    for frag in wait_for(
        "stop requests",
        lambda: (
            all(f["spec"]["desiredState"] == "Stopped" for f in env.fragments("vm4a"))
            and env.fragments("vm4a")
        ),
    ):
        env.report(frag, phase="Stopped")
    wait_for(
        "second VM placed once the first is gone",
        lambda: len(env.fragments("vm4b")) == 2,
        timeout=30,
    )


def test_delete_waits_for_fragments_to_stop(env: Env) -> None:
    running_vm(env, "vm5", "p5")
    vm = env.vm("vm5")
    assert vm is not None and "spanvm.io/finalizer" in vm["metadata"]["finalizers"]
    env.delete_vm("vm5")
    frags = wait_for(
        "fragments asked to stop",
        lambda: (
            all(f["spec"]["desiredState"] == "Stopped" for f in env.fragments("vm5"))
            and env.fragments("vm5")
        ),
    )
    status = env.wait_phase("vm5", "Terminating")
    assert "waiting for fragments" in status["message"]
    env.report(frags[0], phase="Stopped")
    env.report(frags[1], phase="Stopped")
    wait_for("the VM to go", lambda: env.vm("vm5") is None)
    wait_for("its fragments to go", lambda: env.fragments("vm5") == [])


def test_delete_with_a_lost_node_is_bounded(env: Env) -> None:
    frags = running_vm(env, "vm6", "p6")
    env.nodes.kube.core.delete_node("p6-b")  # its agent will never answer
    env.delete_vm("vm6")
    env.report(frags[0], phase="Stopped")
    wait_for("forced deletion after the grace period", lambda: env.vm("vm6") is None, timeout=30)
    assert env.fragments("vm6") == []
    assert any(e.startswith("ForcedDeletion:") and "vm6-1 on p6-b" in e for e in env.events("vm6"))


def test_heartbeat_expiry_degrades_a_once_vm(env: Env) -> None:
    running_vm(env, "vm7", "p7")
    env.nodes.expire("p7-b")
    status = env.wait_phase("vm7", "Degraded")
    assert "p7-b" in status["message"] and "heartbeat" in status["message"]
    assert condition(status, "Ready")["reason"] == "NodeLost"  # why, not the phase again
    env.nodes.heartbeat("p7-b")
    env.wait_phase("vm7", "Running")


def test_node_loss_with_run_strategy_always_reschedules(env: Env) -> None:
    for n in ("p8-a", "p8-b", "p8-c"):
        env.nodes.add(n, labels={"pool": "p8"})
    env.create_vm(vm_manifest("vm8", NS, "p8", run_strategy="Always"))
    frags = run_fragments(env, "vm8")
    first_nodes = [f["spec"]["nodeName"] for f in frags]
    env.wait_phase("vm8", "Running")
    lost = first_nodes[1]
    env.nodes.set_ready(lost, False)
    env.wait_phase("vm8", "Degraded")
    # the node is really gone: fragment 0's fabric loses fragment 1, as the real one does
    env.report(frags[0], phase="Failed", message="fragment 1 lost: no message for 3.0s")

    def replaced() -> list[JsonObject] | None:
        frags = env.fragments("vm8")
        placed = [f["spec"]["nodeName"] for f in frags]
        return frags if len(frags) == 2 and lost not in placed else None

    frags = wait_for("fragments placed again without the lost node", replaced)
    status = env.status("vm8")
    assert status["restarts"] == 1
    assert any(e.startswith("Restarting:") and "fragment 1 lost" in e for e in env.events("vm8"))
    run_fragments(env, "vm8")
    env.wait_phase("vm8", "Running")


def test_spec_changes_immutable_rejected_runstrategy_and_labels_apply(env: Env) -> None:
    running_vm(env, "vm9", "p9")
    bad = env.cluster.kubectl(
        "-n",
        NS,
        "patch",
        "svm",
        "vm9",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"memory": "512Mi"}}),
        check=False,
    )
    assert bad.returncode != 0 and "spec.memory is immutable" in bad.stderr
    env.cluster.kubectl("-n", NS, "label", "svm", "vm9", "tier=gold")
    wait_for(
        "labels carried to fragments",
        lambda: all(f["metadata"]["labels"].get("tier") == "gold" for f in env.fragments("vm9")),
    )

    env.cluster.kubectl(
        "-n", NS, "patch", "svm", "vm9", "--type=merge", "-p", '{"spec":{"runStrategy":"Halted"}}'
    )
    frags = wait_for(
        "stop requests after runStrategy Halted",
        lambda: (
            all(f["spec"]["desiredState"] == "Stopped" for f in env.fragments("vm9"))
            and env.fragments("vm9")
        ),
    )
    for f in frags:
        env.report(f, phase="Stopped")
    status = env.wait_phase("vm9", "Stopped")
    wait_for("fragments removed", lambda: env.fragments("vm9") == [])
    assert condition(status, "Ready")["reason"] == "Halted"
    # nothing stale: FabricReady used to keep "waiting for fragments 0 (Starting)..." with an
    # old observedGeneration, and FRAGMENTS showed 2 while NODES was empty
    generation = (env.vm("vm9") or {})["metadata"]["generation"]
    for type_ in ("Scheduled", "FabricReady", "Ready"):
        cond = condition(status, type_)
        assert cond["status"] == "False" and cond["reason"] == "Halted", cond
        assert cond["observedGeneration"] == generation, cond
    assert "fragmentCount" not in status and "nodes" not in status
    assert status["printableStatus"] == "Stopped"
    row = env.cluster.kubectl("get", "svm", "vm9", "-n", NS, "--no-headers").stdout.split()
    # NAME STATUS READY VCPUS MEMORY (FRAGMENTS and NODES empty) AGE
    assert row[1:5] == ["Stopped", "False", "2", "256Mi"] and len(row) == 6, row


def test_operator_killed_mid_placement_leaves_no_duplicates(
    kube: Kube, crds: Cluster, tmp_path: Path
) -> None:
    ns = "op-crash"
    with own_namespace(kube, crds, ns, tmp_path) as env:
        nodes = env.nodes
        nodes.add("pc-a", labels={"pool": "pc"})
        nodes.add("pc-b", labels={"pool": "pc"})
        env.create_vm(vm_manifest("vmc", ns, "pc"))
        with operator_process(
            crds.kubeconfig, ns, env.log, lease_name="op-crash", crash_after_creates=1
        ) as crashing:
            wait_for(
                "the operator to crash after one fragment", lambda: crashing.poll() is not None
            )
        assert len(env.fragments("vmc", ns)) == 1
        recorded = [f["nodeName"] for f in kube.get_vm(ns, "vmc")["status"]["fragments"]]  # type: ignore[index]
        nodes.add("pc-c", vcpus=64, labels={"pool": "pc"})  # would attract a fresh placement
        with operator_process(crds.kubeconfig, ns, env.log, lease_name="op-crash"):
            frags = wait_for(
                "both fragments",
                lambda: len(env.fragments("vmc", ns)) == 2 and env.fragments("vmc", ns),
            )
            wait_for(
                "peers set", lambda: all(f["spec"].get("peers") for f in env.fragments("vmc", ns))
            )
        assert [f["spec"]["nodeName"] for f in frags] == recorded
        assert [f["metadata"]["name"] for f in env.fragments("vmc", ns)] == ["vmc-0", "vmc-1"]


def test_two_operators_place_once_and_the_follower_takes_over(
    kube: Kube, crds: Cluster, tmp_path: Path
) -> None:
    ns = "op-pair"
    with own_namespace(kube, crds, ns, tmp_path) as env:
        nodes = env.nodes
        nodes.add("pp-a", vcpus=4, labels={"pool": "pp"})
        nodes.add("pp-b", vcpus=4, labels={"pool": "pp"})
        with (
            operator_process(
                crds.kubeconfig, ns, tmp_path / "one.log", lease_name="op-pair"
            ) as one,
            operator_process(
                crds.kubeconfig, ns, tmp_path / "two.log", lease_name="op-pair"
            ) as two,
        ):
            for i in range(4):
                env.create_vm(vm_manifest(f"vmp{i}", ns, "pp", vcpus=2))
            for i in range(4):
                wait_for(f"vmp{i} placed", lambda i=i: placed_whole(env, f"vmp{i}", ns))
            used: dict[str, int] = {}
            for frag in kube.list_fragments(ns):
                node = frag["spec"]["nodeName"]
                used[node] = used.get(node, 0) + len(frag["spec"]["vcpuIds"])
            assert used == {"pp-a": 4, "pp-b": 4}  # every vCPU placed once, none over-committed
            lease = kube.get_lease("spanvm-system", "op-pair")
            assert lease is not None
            holder = lease["spec"]["holderIdentity"]
            leader, follower = (one, two) if f"-{one.pid}-" in holder else (two, one)
            follower_log = tmp_path / ("two.log" if follower is two else "one.log")
            wait_for(  # a slow start may log after the leader placed everything
                "the follower to wait for the Lease",
                lambda: "waiting for the operator Lease" in follower_log.read_text(),
            )
            leader.terminate()
            leader.wait(15)
            env.create_vm(vm_manifest("vmp-late", ns, "pp", vcpus=1, max_fragments=1))
            env.nodes.add("pp-c", vcpus=1, labels={"pool": "pp"})
            wait_for(
                "the follower to take over and place a new VM",
                lambda: placed_whole(env, "vmp-late", ns),
                timeout=40,
            )
            assert follower.poll() is None


# -- issue 13: faults found from outside ------------------------------------------------------


def reconciles(env: Env) -> float:
    """Reconcile passes the module operator has made so far (its metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics").read().decode()
    lines = [m for m in text.splitlines() if m.startswith("spanvm_reconcile_total{")]
    return sum(float(m.split()[1]) for m in lines)


def later_passes(env: Env, count: int = 3) -> None:
    """Until the operator has made `count` more passes (the recheck runs every second)."""
    start = reconciles(env)
    wait_for(f"{count} more reconcile passes", lambda: reconciles(env) >= start + count)


def stop_requested(env: Env, name: str) -> list[JsonObject]:
    return wait_for(
        f"stop requests for {name}",
        lambda: (
            all(f["spec"]["desiredState"] == "Stopped" for f in env.fragments(name))
            and env.fragments(name)
        ),
    )


def test_names_up_to_253_characters_are_placed_run_and_deleted(env: Env) -> None:
    """Kind 1: a 64- or 250-character VM name and 64- or 253-character node names become
    valid label values, selectors, child and Lease names; the VM runs and is deletable."""
    node64, node253 = "k1-" + "a" * 61, "k" * 253
    env.nodes.add(node64, vcpus=2, labels={"pool": "k1"})
    env.nodes.add(node253, vcpus=2, labels={"pool": "k1"})
    names = ["v" * 64, "w" * 250]
    for name in names:
        env.create_vm(vm_manifest(name, NS, "k1", vcpus=2, max_fragments=1))
    for name in names:
        frags = wait_for(f"{name[:8]}… placed", lambda n=name: env.fragments(n))
        labels = frags[0]["metadata"]["labels"]
        assert all(len(v) <= 63 for v in labels.values()), labels
        assert len(frags[0]["metadata"]["name"]) <= 253
        secret = fabric_secret_name(name, env.vm(name)["metadata"]["uid"])  # type: ignore[index]
        assert frags[0]["spec"]["secretRef"]["name"] == secret
        assert env.kube.read_secret_key(NS, secret, "fabric-key") is not None
        env.report(frags[0], phase="Running", endpoint="10.0.0.1:7000")
        env.wait_phase(name, "Running")
    assert {env.fragments(n)[0]["spec"]["nodeName"] for n in names} == {node64, node253}
    for name in names:
        env.delete_vm(name)
        for frag in stop_requested(env, name):
            env.report(frag, phase="Stopped")
        wait_for(f"{name[:8]}… deleted (finalizer released)", lambda n=name: env.vm(n) is None)


def test_an_agent_on_a_253_character_node_finds_its_fragments(env: Env, tmp_path: Path) -> None:
    """Kind 1, agent side: its heartbeat Lease and its fragment selector are valid for the
    longest node name; a fragment whose Secret is missing says so."""
    node = "m" * 253
    env.nodes.add(node, labels={"pool": "k1b"})
    publisher = NodePublisher(
        env.kube, node, SYSTEM_NS, kvm_device="/dev/kvm", offer=Offer(), lease_duration=6
    )
    publisher.renew_lease()
    lease = env.kube.get_lease(SYSTEM_NS, agent_lease_name(node))
    assert lease is not None and lease["spec"]["holderIdentity"] == node
    vm = {"metadata": {"name": "x" * 250, "namespace": NS, "uid": "not-a-vm"}}
    spec = SpanningVMSpec.model_validate(vm_manifest("x", NS, "k1b")["spec"])
    placed = [
        FragmentSummary(name="x" * 248 + "-0", node_name=node, vcpu_ids=[0], memory=spec.memory)
    ]
    body = fragment_body(vm, spec, placed, 0)
    del body["metadata"]["ownerReferences"]  # no VM of ours: the operator leaves it alone
    body["spec"]["fragmentCount"] = 1
    assert env.kube.create_fragment(NS, body)
    agent = Agent(env.kube, node, publisher, state_dir=tmp_path, listen_host="127.0.0.1")
    agent.sync()
    status = env.kube.get_fragment(NS, body["metadata"]["name"])["status"]  # type: ignore[index]
    assert status["phase"] == "Pending"
    secret = fabric_secret_name("x" * 250, "not-a-vm")
    assert status["message"] == (
        f"waiting for the operator to seal the fabric key of Secret {secret} to this node"
    )


def test_a_failed_vm_releases_its_capacity(env: Env) -> None:
    """Kind 4: a Failed (Once) VM's fragments are asked to stop and no longer counted, so the
    next VM is placed without the failed one being deleted or its agent answering."""
    env.nodes.add("k4-a", labels={"pool": "k4"})
    env.nodes.add("k4-b", labels={"pool": "k4"})
    env.create_vm(vm_manifest("vm-k4a", NS, "k4"))
    frags = wait_for(
        "2 fragments", lambda: len(env.fragments("vm-k4a")) == 2 and env.fragments("vm-k4a")
    )
    env.report(frags[1], phase="Failed", message="memory above 64Gi is not supported by this VMM")
    env.wait_phase("vm-k4a", "Failed")
    wait_for(
        "the surviving fragment asked to stop",
        lambda: env.fragments("vm-k4a")[0]["spec"]["desiredState"] == "Stopped",
    )
    env.create_vm(vm_manifest("vm-k4b", NS, "k4"))
    wait_for("the new VM placed", lambda: placed_whole(env, "vm-k4b", NS))
    assert env.status("vm-k4a")["phase"] == "Failed"


def test_a_finished_vm_is_final_and_phases_never_go_back(env: Env) -> None:
    """Kinds 7 and 11: fragment 0 finishing first keeps the VM Running (not Starting); once
    Succeeded, a fragment deleted by hand is not re-created and the phase stays."""
    frags = running_vm(env, "vm-k7", "k7")
    env.report(frags[0], phase="Succeeded", exitCode=0, consoleTail="done\n")
    later_passes(env)
    assert env.status("vm-k7")["phase"] == "Running"
    env.report(frags[1], phase="Succeeded", exitCode=0)
    env.wait_phase("vm-k7", "Succeeded")
    env.kube.delete_fragment(NS, frags[1]["metadata"]["name"])
    wait_for("the fragment gone", lambda: len(env.fragments("vm-k7")) == 1)
    later_passes(env)
    assert [f["metadata"]["name"] for f in env.fragments("vm-k7")] == ["vm-k7-0"]
    status = env.status("vm-k7")
    assert status["phase"] == "Succeeded" and status["exitCode"] == 0
    backwards = [e for e in env.events("vm-k7") if e.startswith("Starting:") and "Succeeded" in e]
    assert backwards == [], env.events("vm-k7")


def test_deleting_finished_vms_is_prompt(env: Env) -> None:
    """Kind 10: deleting a finished VM is bounded (once a Kopf timer per VM held deletions
    for its 60 s cancellation polling; the periodic recheck holds none). 20 VMs, one after
    the other; each must be gone well inside 60 s (a behavioural bound, not a timing one:
    the seconds are printed)."""
    env.nodes.add("k10-a", vcpus=20, memory="64Gi", labels={"pool": "k10"})
    names = [f"vm-k10-{i}" for i in range(20)]
    for name in names:
        env.create_vm(vm_manifest(name, NS, "k10", vcpus=1, max_fragments=1, memory="64Mi"))
    for name in names:
        frag = wait_for(f"{name} placed", lambda n=name: env.fragments(n))[0]
        env.report(frag, phase="Succeeded", exitCode=0)
    for name in names:
        env.wait_phase(name, "Succeeded")
    took = []
    for name in names:
        started = time.monotonic()
        env.delete_vm(name)
        wait_for(f"{name} deleted", lambda n=name: env.vm(n) is None, timeout=30, interval=0.05)
        took.append(time.monotonic() - started)
    print("deletion seconds:", " ".join(f"{t:.2f}" for t in took))


def test_a_foreign_object_holding_a_child_name_is_reported_not_adopted(env: Env) -> None:
    """Kind 6: a VMFragment named like the VM's first fragment, made by someone else: the
    clash is a condition and an Event naming it; the object is neither adopted nor touched."""
    env.nodes.add("k6-a", labels={"pool": "k6"})
    env.nodes.add("k6-b", labels={"pool": "k6"})
    vm = {"metadata": {"name": "vm-k6", "namespace": NS, "uid": "someone-else"}}
    spec = SpanningVMSpec.model_validate(vm_manifest("vm-k6", NS, "k6")["spec"])
    placed = [
        FragmentSummary(name="vm-k6-0", node_name="elsewhere", vcpu_ids=[0], memory=spec.memory)
    ]
    foreign = fragment_body(vm, spec, placed, 0)
    foreign["metadata"] = {"name": "vm-k6-0", "namespace": NS, "labels": {"made-by": "hand"}}
    foreign["spec"]["fragmentCount"] = 1
    assert env.kube.create_fragment(NS, foreign)
    env.create_vm(vm_manifest("vm-k6", NS, "k6"))
    status = wait_for_ready_reason(env, "vm-k6", "NameConflict")
    assert "VMFragment vm-k6-0 (owner: none)" in status["message"], status["message"]
    assert any(e.startswith("NameConflict:") and "vm-k6-0" in e for e in env.events("vm-k6"))
    later_passes(env)
    mine = env.kube.get_fragment(NS, "vm-k6-0")
    assert mine is not None and not mine["metadata"].get("ownerReferences")
    assert mine["metadata"]["labels"] == {"made-by": "hand"}
    assert mine["spec"]["nodeName"] == "elsewhere" and mine["spec"]["desiredState"] == "Running"
    env.kube.delete_fragment(NS, "vm-k6-0")  # its maker removes it: the VM goes on
    wait_for("the VM placed once the name is free", lambda: placed_whole(env, "vm-k6", NS))


def test_a_recreated_vm_never_uses_its_predecessors_children(env: Env) -> None:
    """Kind 5: a VM deleted and re-created under the same name before the garbage collector
    ran. Its predecessor's Secret is never reused (Secret names carry the owner's uid); its
    predecessor's fragment, holding the name the new VM needs, is waited for and named
    (WaitingForOldObjects), never adopted; once collected, the new VM proceeds."""
    env.nodes.add("k5-a", labels={"pool": "k5"})
    env.nodes.add("k5-b", labels={"pool": "k5"})
    old_uid = "00000000-0000-0000-0000-0000000000k5"
    owner = [
        {"apiVersion": "spanvm.io/v1alpha1", "kind": "SpanningVM", "name": "vm-k5", "uid": old_uid}
    ]
    hold = ["spanvm.io/test-hold"]  # the collector's delete waits while the test holds them
    old_secret = fabric_secret_name("vm-k5", old_uid)
    env.kube.core.create_namespaced_secret(
        NS,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": old_secret,
                "namespace": NS,
                "finalizers": hold,
                "ownerReferences": owner,
            },
            "data": {"fabric-key": "b2xk"},
        },
    )
    old_vm = {"metadata": {"name": "vm-k5", "namespace": NS, "uid": old_uid}}
    spec = SpanningVMSpec.model_validate(vm_manifest("vm-k5", NS, "k5")["spec"])
    placed = [FragmentSummary(name="vm-k5-0", node_name="k5-a", vcpu_ids=[0], memory=spec.memory)]
    old_fragment = fragment_body(old_vm, spec, placed, 0)
    old_fragment["metadata"]["finalizers"] = hold
    old_fragment["spec"]["fragmentCount"] = 1
    assert env.kube.create_fragment(NS, old_fragment)
    env.create_vm(vm_manifest("vm-k5", NS, "k5"))
    status = wait_for_ready_reason(env, "vm-k5", "WaitingForOldObjects")
    assert (
        f"VMFragment vm-k5-0 (of an earlier SpanningVM vm-k5, uid {old_uid})" in (status["message"])
    )
    assert any(e.startswith("WaitingForOldObjects:") for e in env.events("vm-k5"))
    for frag in env.kube.list_fragments(NS):  # nothing started, nothing adopted
        uids = [o["uid"] for o in frag["metadata"].get("ownerReferences") or []]
        assert frag["metadata"]["name"] != "vm-k5-0" or uids == [old_uid]
        # ours (fragment 1) knows its peers but cannot start: fragment 0 has no endpoint
        assert not any(p.get("endpoint") for p in frag["spec"].get("peers") or [])
    unfinalize = {"metadata": {"finalizers": None}}
    env.kube.patch_fragment(NS, "vm-k5-0", unfinalize)
    env.kube.delete_fragment(NS, "vm-k5-0")
    frags = wait_for(
        "placed once the old fragment is gone",
        lambda: placed_whole(env, "vm-k5", NS) and env.fragments("vm-k5"),
    )
    vm = env.vm("vm-k5")
    assert vm is not None
    new_secret = fabric_secret_name("vm-k5", vm["metadata"]["uid"])
    assert new_secret != old_secret
    assert {f["spec"]["secretRef"]["name"] for f in frags} == {new_secret}
    ours = env.kube.core.read_namespaced_secret(new_secret, NS)
    assert ours.metadata.owner_references[0].uid == vm["metadata"]["uid"]
    theirs = env.kube.core.read_namespaced_secret(old_secret, NS)  # untouched, not adopted
    assert [o.uid for o in theirs.metadata.owner_references] == [old_uid]
    env.kube.core.patch_namespaced_secret(old_secret, NS, unfinalize)
    unless_status(lambda: env.kube.core.delete_namespaced_secret(old_secret, NS), NOT_FOUND)


def test_heartbeats_are_judged_by_the_operators_own_clock(env: Env) -> None:
    """Kind 8: an agent 30 s behind that renews is alive; one 1 h ahead that stops renewing is
    lost one lease duration later, and the node is named."""
    env.nodes.add("k8-behind", labels={"pool": "k8"})
    env.nodes.add("k8-ahead", labels={"pool": "k8b"})
    stop = threading.Event()

    def renew_behind() -> None:
        while not stop.wait(0.5):
            env.nodes.heartbeat("k8-behind", age=30, duration=6)

    # k8-ahead renews until both VMs run (however long placing them takes on a loaded
    # machine), then falls silent: lost one lease duration after its last renewal.
    quiet = threading.Event()

    def renew_ahead() -> None:
        env.nodes.heartbeat("k8-ahead", age=-3600, duration=6)
        while not quiet.wait(0.5):
            env.nodes.heartbeat("k8-ahead", age=-3600, duration=6)

    renewer = threading.Thread(target=renew_behind, daemon=True)
    renewer.start()
    ahead = threading.Thread(target=renew_ahead, daemon=True)
    ahead.start()
    try:
        env.create_vm(vm_manifest("vm-k8a", NS, "k8", vcpus=1, max_fragments=1))
        env.create_vm(vm_manifest("vm-k8b", NS, "k8b", vcpus=1, max_fragments=1))
        for name in ("vm-k8a", "vm-k8b"):
            frag = wait_for(f"{name} placed", lambda n=name: env.fragments(n))[0]
            env.report(frag, phase="Running", endpoint="10.0.0.1:7000")
            env.wait_phase(name, "Running")
        quiet.set()
        ahead.join()
        status = env.wait_phase("vm-k8b", "Degraded")
        assert "the agent on node k8-ahead stopped heartbeating" in status["message"]
        env.create_vm(vm_manifest("vm-k8c", NS, "k8b", vcpus=1, max_fragments=1))
        pending = wait_for("vm-k8c refused", lambda: env.status("vm-k8c").get("message"))
        assert "with a stale agent heartbeat (k8-ahead)" in pending
        later_passes(env)
        assert env.status("vm-k8a")["phase"] == "Running"
    finally:
        stop.set()
        quiet.set()
        renewer.join()
        ahead.join()


def test_node_loss_waits_for_the_grace_and_for_the_fabric(env: Env) -> None:
    """Kind 9: on a node NotReady, Always VMs with a fragment there are Degraded, not
    restarted, while the loss lasts less than --node-loss-grace. Past the grace, a VM whose
    other fragments still run (their fabric still reaches the node) is left alone; one with
    no fragment elsewhere is restarted, never sooner than the grace; and when the fabric
    does lose the node, the VM restarts at once."""
    env.nodes.add("k9-a", vcpus=2, labels={"pool": "k9"})
    env.nodes.add("k9-b", vcpus=2, labels={"pool": "k9"})
    env.create_vm(vm_manifest("vm-k9", NS, "k9", vcpus=3, run_strategy="Always"))
    spread = wait_for(
        "vm-k9 placed", lambda: len(env.fragments("vm-k9")) == 2 and env.fragments("vm-k9")
    )
    assert [f["spec"]["nodeName"] for f in spread] == ["k9-a", "k9-b"]
    env.create_vm(vm_manifest("vm-k9s", NS, "k9", vcpus=1, max_fragments=1, run_strategy="Always"))
    alone = wait_for("vm-k9s placed", lambda: env.fragments("vm-k9s"))
    assert alone[0]["spec"]["nodeName"] == "k9-b"
    for i, frag in enumerate([*spread, *alone]):
        env.report(frag, phase="Running", endpoint=f"10.0.0.{i + 1}:7000")
    env.wait_phase("vm-k9", "Running")
    env.wait_phase("vm-k9s", "Running")

    env.nodes.set_ready("k9-b", False)  # a flap
    env.wait_phase("vm-k9", "Degraded")
    env.wait_phase("vm-k9s", "Degraded")
    env.nodes.set_ready("k9-b", True)
    env.wait_phase("vm-k9", "Running")
    env.wait_phase("vm-k9s", "Running")
    assert not env.status("vm-k9").get("restarts") and not env.status("vm-k9s").get("restarts")
    assert [f["metadata"]["uid"] for f in env.fragments("vm-k9")] == [
        f["metadata"]["uid"] for f in spread
    ]

    flipped = time.monotonic()
    env.nodes.set_ready("k9-b", False)  # a loss
    wait_for("vm-k9s restarted", lambda: env.status("vm-k9s").get("restarts") == 1, timeout=60)
    assert time.monotonic() - flipped >= GRACE
    # the same node, lost as long: vm-k9's fragment on k9-a still runs, so it is left alone
    assert not env.status("vm-k9").get("restarts")
    assert env.status("vm-k9")["phase"] == "Degraded"
    env.report(spread[0], phase="Failed", message="fragment 1 lost: no message for 3.0s")
    wait_for("vm-k9 restarted", lambda: env.status("vm-k9").get("restarts") == 1)


def test_a_vm_whose_delete_handler_keeps_failing_is_still_deletable(env: Env) -> None:
    """Kind 1: an API server that refuses what the delete handler does (here an admission
    policy refusing stop requests) no longer holds the finalizer forever: after
    --deletion-grace the VM goes, with a ForcedDeletion Event saying why."""
    policy = "k1-refuse-stop"
    refuse = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": policy},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["spanvm.io"],
                        "apiVersions": ["*"],
                        "operations": ["UPDATE"],
                        "resources": ["vmfragments"],
                    }
                ]
            },
            "validations": [
                {
                    "expression": "object.spec.desiredState != 'Stopped'",
                    "message": "stop requests are refused here (test)",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": policy},
        "spec": {
            "policyName": policy,
            "validationActions": ["Deny"],
            "matchResources": {"objectSelector": {"matchLabels": {"refuse-stop": "yes"}}},
        },
    }
    running_vm(env, "vm-k1d", "k1d")
    env.cluster.kubectl("label", "-n", NS, "svm", "vm-k1d", "refuse-stop=yes")
    wait_for(
        "the label on the fragments",
        lambda: all(f["metadata"]["labels"].get("refuse-stop") for f in env.fragments("vm-k1d")),
    )
    probe_spec = SpanningVMSpec.model_validate(vm_manifest("x", NS, "k1d")["spec"])
    probe = fragment_body(
        {"metadata": {"name": "k1d-probe", "namespace": NS, "uid": "none"}},
        probe_spec,
        [
            FragmentSummary(
                name="k1d-probe", node_name="nowhere", vcpu_ids=[0], memory=probe_spec.memory
            )
        ],
        0,
    )
    probe["metadata"] = {"name": "k1d-probe", "namespace": NS, "labels": {"refuse-stop": "yes"}}
    probe["spec"]["fragmentCount"] = 1
    env.kube.create_fragment(NS, probe)
    env.cluster.kubectl("apply", "-f", "-", stdin=json.dumps(refuse))
    env.cluster.kubectl("apply", "-f", "-", stdin=json.dumps(binding))
    try:

        def refused() -> bool:
            patch = {"spec": {"desiredState": "Stopped"}}
            try:
                env.kube.patch_fragment(NS, "k1d-probe", patch)
            except ApiException as err:
                return err.status in (403, 422)
            env.kube.patch_fragment(NS, "k1d-probe", {"spec": {"desiredState": "Running"}})
            return False

        wait_for("the admission policy in force", refused)
        env.delete_vm("vm-k1d")
        wait_for("the VM deleted despite the failing handler", lambda: env.vm("vm-k1d") is None)
        events = env.events("vm-k1d")
        assert any(e.startswith("ForcedDeletion:") and "deletion failed" in e for e in events)
    finally:
        env.cluster.kubectl("delete", "validatingadmissionpolicybinding", policy)
        env.cluster.kubectl("delete", "validatingadmissionpolicy", policy)


def test_a_fragment_waiting_for_a_missing_secret_is_reported_on_the_vm(
    env: Env, tmp_path: Path
) -> None:
    """Kind 5, last part: the agent (in-process, real) holds a fragment whose Secret is gone
    and says so; the VM's status names the Secret instead of failing later on a timeout."""
    env.nodes.add("k5s-a", labels={"pool": "k5s"})
    env.create_vm(vm_manifest("vm-k5s", NS, "k5s", vcpus=1, max_fragments=1))
    wait_for("placed", lambda: env.fragments("vm-k5s"))
    secret = fabric_secret_name("vm-k5s", env.vm("vm-k5s")["metadata"]["uid"])  # type: ignore[index]
    env.kube.core.delete_namespaced_secret(secret, NS)
    publisher = NodePublisher(
        env.kube, "k5s-a", SYSTEM_NS, kvm_device="/dev/kvm", offer=Offer(), lease_duration=60
    )
    Agent(env.kube, "k5s-a", publisher, state_dir=tmp_path, listen_host="127.0.0.1").sync()
    status = wait_for(
        "the VM naming the missing Secret",
        lambda: (
            env.status("vm-k5s")
            if f"fabric key of Secret {secret} to this node"
            in (env.status("vm-k5s").get("message") or "")
            else None
        ),
    )
    assert status["phase"] == "Starting"


def test_a_fragment_deleted_under_a_running_once_vm_fails_it_not_relaunched(env: Env) -> None:
    """Kinds 7 and 11: re-creating fragments happens only where the run strategy says so. A
    fragment deleted by hand under a running Once guest fails the VM, naming it; nothing is
    relaunched and the survivor is asked to stop."""
    frags = running_vm(env, "vm-k7r", "k7r")
    env.kube.delete_fragment(NS, frags[1]["metadata"]["name"])
    status = env.wait_phase("vm-k7r", "Failed")
    assert "fragment(s) vm-k7r-1 deleted after the guest started" in status["message"]
    wait_for(
        "the survivor asked to stop",
        lambda: env.fragments("vm-k7r")[0]["spec"]["desiredState"] == "Stopped",
    )
    later_passes(env)
    assert [f["metadata"]["name"] for f in env.fragments("vm-k7r")] == ["vm-k7r-0"]
    assert env.status("vm-k7r")["phase"] == "Failed"


@pytest.mark.kvm
def test_a_vm_with_a_250_character_name_runs_on_a_real_agent(env: Env, tmp_path: Path) -> None:
    """Kind 1, end to end on one node: the operator places a VM whose name is 250 characters;
    the real agent code (in-process, real fragment process under KVM) launches it (its state
    directory name stays a valid file name) and the guest finishes."""
    node, name = "k1r-a", "r" * 250
    env.nodes.add(node, labels={"pool": "k1r"})
    env.create_vm(vm_manifest(name, NS, "k1r", vcpus=1, max_fragments=1, payload="hello"))
    wait_for(
        "placed with peers", lambda: (env.fragments(name) or [{}])[0].get("spec", {}).get("peers")
    )
    publisher = NodePublisher(
        env.kube, node, SYSTEM_NS, kvm_device="/dev/kvm", offer=Offer(), lease_duration=60,
        node_key=load_or_create(tmp_path / "node.key"),
    )  # fmt: skip
    publisher.publish_capabilities()  # with the public key the operator seals the key to
    agent = Agent(env.kube, node, publisher, state_dir=tmp_path, listen_host="127.0.0.1")

    def finished() -> bool:
        agent.sync()
        phase = (env.fragments(name)[0].get("status") or {}).get("phase")
        return phase in ("Succeeded", "Failed")

    try:
        wait_for("the fragment to finish", finished, timeout=90, interval=0.5)
        status = env.wait_phase(name, "Succeeded")
        assert status["exitCode"] == 0
    finally:
        for proc in agent.processes.values():
            proc.stop()


def test_a_fragment_deleted_under_an_always_vm_restarts_it_whole(env: Env) -> None:
    """Kind 7, the other run strategy: Always restarts the guest whole (every fragment new),
    never relaunches the one fragment into the running guest."""
    for n in ("k7a-a", "k7a-b"):
        env.nodes.add(n, labels={"pool": "k7a"})
    env.create_vm(vm_manifest("vm-k7a", NS, "k7a", run_strategy="Always"))
    frags = run_fragments(env, "vm-k7a")
    env.wait_phase("vm-k7a", "Running")
    env.kube.delete_fragment(NS, frags[1]["metadata"]["name"])
    wait_for("a restart", lambda: env.status("vm-k7a").get("restarts") == 1)
    old = {f["metadata"]["uid"] for f in frags}
    again = wait_for(
        "placed anew",
        lambda: (
            len(env.fragments("vm-k7a")) == 2
            and not old & {f["metadata"]["uid"] for f in env.fragments("vm-k7a")}
            and env.fragments("vm-k7a")
        ),
    )
    assert all(f["spec"]["desiredState"] == "Running" for f in again)
    assert any("deleted after the guest started" in e for e in env.events("vm-k7a"))


def finish(env: Env, frags: list[JsonObject], phase: str, code: int, message: str) -> None:
    """Stand-in agents: fragment 0 ends the guest with `code`, the other stops with it."""
    env.report(frags[0], phase=phase, exitCode=code, message=message)
    for frag in frags[1:]:
        env.report(frag, phase="Stopped", message="stopped on request")


def placed_anew(env: Env, name: str, old: list[JsonObject]) -> list[JsonObject]:
    """The VM's fragments once a new placement has made both anew."""
    uids = {f["metadata"]["uid"] for f in old}
    return wait_for(
        f"{name} placed anew",
        lambda: (
            len(frags := env.fragments(name)) == 2
            and not uids & {f["metadata"]["uid"] for f in frags}
            and frags
        ),
    )


def test_always_restarts_after_exit_0_rerun_on_failure_does_not(env: Env) -> None:
    """KubeVirt's meanings: `Always` on a guest that exits 0 used to stay Succeeded (what
    RerunOnFailure does); now it is restarted, and RerunOnFailure exists."""
    for pool in ("ka", "kr"):
        env.nodes.add(f"{pool}-a", labels={"pool": pool})
        env.nodes.add(f"{pool}-b", labels={"pool": pool})
    env.create_vm(vm_manifest("vm-ka", NS, "ka", run_strategy="Always"))
    env.create_vm(vm_manifest("vm-kr", NS, "kr", run_strategy="RerunOnFailure"))
    always, rerun = run_fragments(env, "vm-ka"), run_fragments(env, "vm-kr")
    env.wait_phase("vm-ka", "Running")
    status = env.wait_phase("vm-kr", "Running")
    assert status["printableStatus"] == "Running"
    assert condition(status, "Ready")["reason"] == "GuestRunning"  # not "Running" again

    finish(env, always, "Succeeded", 0, "the guest finished")
    wait_for("vm-ka restarted", lambda: env.status("vm-ka").get("restarts") == 1)
    placed_anew(env, "vm-ka", always)
    assert any(e.startswith("GuestRestarted:") for e in env.events("vm-ka"))

    finish(env, rerun, "Succeeded", 0, "the guest finished")
    status = env.wait_phase("vm-kr", "Succeeded")
    time.sleep(3)  # a few passes: exit 0 is final for RerunOnFailure
    status = env.status("vm-kr")
    assert status["phase"] == "Succeeded" and not status.get("restarts")
    assert status["printableStatus"] == "Succeeded"
    assert condition(status, "Ready")["reason"] == "GuestFinished"


def test_failures_in_a_row_back_off_as_crash_loop_back_off(env: Env) -> None:
    env.nodes.add("kc-a", labels={"pool": "kc"})
    env.nodes.add("kc-b", labels={"pool": "kc"})
    env.create_vm(vm_manifest("vm-kc", NS, "kc", run_strategy="RerunOnFailure"))
    frags = run_fragments(env, "vm-kc")
    env.wait_phase("vm-kc", "Running")
    finish(env, frags, "Failed", 3, "the guest exited with code 3")
    wait_for("the first restart, at once", lambda: env.status("vm-kc").get("restarts") == 1)
    frags = placed_anew(env, "vm-kc", frags)
    for i, frag in enumerate(frags):
        env.report(frag, phase="Running", endpoint=f"10.0.0.{i + 1}:7000")
    env.wait_phase("vm-kc", "Running")
    failed_at = time.monotonic()
    finish(env, frags, "Failed", 3, "the guest exited with code 3")
    status = wait_for(
        "CrashLoopBackOff",
        lambda: (s := env.status("vm-kc")).get("printableStatus") == "CrashLoopBackOff" and s,
    )
    assert status["startFailure"]["consecutiveFailCount"] == 2
    assert status["startFailure"]["retryAfterTimestamp"]
    assert condition(status, "Ready")["reason"] == "CrashLoopBackOff"
    assert status.get("restarts") == 1  # waiting, not restarted yet
    wait_for("the second restart", lambda: env.status("vm-kc").get("restarts") == 2)
    assert time.monotonic() - failed_at >= BACKOFF - 1  # the API's times are whole seconds
    assert any(e.startswith("CrashLoopBackOff:") for e in env.events("vm-kc"))


def test_manual_runs_only_when_asked_through_the_cli(env: Env, tmp_path: Path) -> None:
    """`spanvm start|stop|restart` against the operator: a Manual VM waits for start, stops
    on stop (conditions and counts cleared), and a restart places it anew."""
    env.nodes.add("km-a", labels={"pool": "km"})
    env.nodes.add("km-b", labels={"pool": "km"})
    env.create_vm(vm_manifest("vm-km", NS, "km", run_strategy="Manual"))
    status = env.wait_phase("vm-km", "Stopped")
    assert status["printableStatus"] == "Stopped"
    assert condition(status, "Ready")["reason"] == "WaitingForStart"
    time.sleep(2)
    assert env.fragments("vm-km") == []

    def cli(verb: str) -> None:
        result = spanvm(verb, "vm-km", "-n", NS, kubeconfig=env.cluster.kubeconfig)
        assert result.returncode == 0, result.stderr

    cli("start")
    frags = run_fragments(env, "vm-km")
    status = env.wait_phase("vm-km", "Running")
    assert status["lastRequest"].startswith("start/")
    cli("restart")
    frags = placed_anew(env, "vm-km", frags)
    assert env.status("vm-km")["restarts"] == 1
    assert any(e.startswith("RestartRequested:") for e in env.events("vm-km"))
    for i, frag in enumerate(frags):
        env.report(frag, phase="Running", endpoint=f"10.0.0.{i + 1}:7000")
    env.wait_phase("vm-km", "Running")
    cli("stop")
    wait_for(
        "stop requests",
        lambda: all(f["spec"]["desiredState"] == "Stopped" for f in env.fragments("vm-km")),
    )
    assert env.status("vm-km")["printableStatus"] == "Stopping"
    for frag in frags:
        env.report(frag, phase="Stopped", message="stopped on request")
    status = env.wait_phase("vm-km", "Stopped")
    assert condition(status, "FabricReady")["reason"] == "StoppedByRequest"
    assert "fragmentCount" not in status
    assert env.vm("vm-km")["spec"]["runStrategy"] == "Manual"  # type: ignore[index]


def test_pause_reaches_every_fragment_and_events_name_the_operator_pod(env: Env) -> None:
    """Events used to come from component `kopf`, instance `dev`."""
    frags = running_vm(env, "vm-kp", "kp")
    env.kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, SPANNINGVM_PLURAL, "vm-kp",
        {"metadata": {"annotations": {"spanvm.io/paused": "true"}}},
    )  # fmt: skip
    wait_for(
        "pause requests",
        lambda: all(f["spec"]["desiredState"] == "Paused" for f in env.fragments("vm-kp")),
    )
    for frag in frags:
        env.report(frag, phase="Paused", message="vCPUs paused on request")
    status = wait_for(
        "Paused", lambda: (s := env.status("vm-kp")).get("printableStatus") == "Paused" and s
    )
    assert status["phase"] == "Running"
    assert condition(status, "Ready")["status"] == "False"
    assert condition(status, "Ready")["reason"] == "Paused"

    items = env.kube.core.list_namespaced_event(
        NS, field_selector="involvedObject.name=vm-kp"
    ).items
    sources = {(e.reporting_component, e.reporting_instance, e.source.component) for e in items}
    assert sources == {("spanvm-operator", POD_NAME, "spanvm-operator")}, sources
