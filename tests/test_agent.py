"""The node agent against the real API server and real KVM: each agent a host process in its
own network namespace, VMFragments written by the test as the operator would write them."""

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Cluster
from k8s_sim import ensure_namespace, wait_for
from spanvm.agent.capabilities import DETAILS_ANNOTATION
from spanvm.agent.fragment_process import FragmentProcess
from spanvm.agent.runner import EXIT, STATUS
from spanvm.api.constants import (
    ALLOCATABLE_VCPUS_ANNOTATION,
    GROUP,
    KVM_LABEL,
    SPANNINGVM_PLURAL,
    VERSION,
    VM_LABEL,
    agent_lease_name,
)
from spanvm.api.quantity import format_memory, parse_memory
from spanvm.api.spanningvm import FragmentSummary, SpanningVMSpec
from spanvm.contract import Connected, Failed, Listening
from spanvm.controller.fragments import fabric_secret, fragment_body, peers_of
from spanvm.controller.key_courier import sealed_key_patch
from spanvm.devcluster.nodes import SimulatedNodes
from spanvm.kube import JsonObject, Kube
from spanvm.payloads.kernels import kernel_path
from spanvm.procs import pid_alive
from spanvm.rfc3339 import parse_time
from spanvm.shares import memory_shares
from spanvm.vmm.expected import smp_sum

pytestmark = [pytest.mark.cluster, pytest.mark.kvm]
NS = "agent-test"
SYSTEM_NS = "spanvm-system"


@pytest.fixture(scope="module")
def kube(crds: Cluster) -> Kube:
    kube = Kube.connect(str(crds.kubeconfig))
    ensure_namespace(kube, NS)
    ensure_namespace(kube, SYSTEM_NS)
    return kube


@pytest.fixture(scope="module")
def nodes(
    kube: Kube, crds: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimulatedNodes]:
    sim = SimulatedNodes(
        kube,
        crds.kubeconfig,
        crds.plane.ports.apiserver,
        ["ag-a", "ag-b"],
        tmp_path_factory.mktemp("agents"),
        system_namespace=SYSTEM_NS,
    )
    sim.up()
    try:
        yield sim
    finally:
        for node in sim.names:
            print(f"--- agent log {node}:\n{sim.log_of(node).read_text()[-3000:]}")
        sim.down()


def owner_vm(kube: Kube, name: str, spec: JsonObject) -> JsonObject:
    """A SpanningVM to own the fragments (no operator runs here: the test plays it)."""
    body = {
        "apiVersion": "spanvm.io/v1alpha1",
        "kind": "SpanningVM",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }
    vm: JsonObject = kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, SPANNINGVM_PLURAL, body
    )
    kube.create_secret(NS, fabric_secret(vm))
    return vm


def place(kube: Kube, name: str, spec: JsonObject, nodes: list[str]) -> list[str]:
    """Create the fragments as the operator would, with peers (endpoints filled in later)."""
    vm = owner_vm(kube, name, spec)
    parsed = SpanningVMSpec.model_validate(spec)
    per = parsed.cpu.vcpus // len(nodes)
    shares = memory_shares(parse_memory(parsed.memory), [per] * len(nodes)) or []
    placed = [
        FragmentSummary(
            name=f"{name}-{i}",
            node_name=n,
            vcpu_ids=list(range(i * per, (i + 1) * per)),
            memory=format_memory(share),
        )
        for i, (n, share) in enumerate(zip(nodes, shares, strict=True))
    ]
    bodies = [fragment_body(vm, parsed, placed, i) for i in range(len(placed))]
    for body in bodies:
        kube.create_fragment(NS, body)
        created = kube.get_fragment(NS, body["metadata"]["name"])
        assert created is not None
        sealed = sealed_key_patch(kube, created)  # the operator's key courier, played here
        assert sealed is not None
        kube.patch_fragment(NS, body["metadata"]["name"], sealed)
    share_peers(kube, name, placed)
    return [p.name for p in placed]


def share_peers(kube: Kube, name: str, placed: list[FragmentSummary]) -> None:
    frags = {int(f["spec"]["index"]): f for f in kube.list_fragments(NS, f"{VM_LABEL}={name}")}
    peers = peers_of(placed, frags)
    for f in frags.values():
        if f["spec"].get("peers") != peers:
            kube.patch_fragment(NS, f["metadata"]["name"], {"spec": {"peers": peers}})


def fragment(kube: Kube, name: str) -> JsonObject:
    obj = kube.get_fragment(NS, name)
    assert obj is not None
    return obj


def phase(kube: Kube, name: str) -> str | None:
    return (fragment(kube, name).get("status") or {}).get("phase")


def spec_of(payload: str, vcpus: int, memory: str, arg: int) -> JsonObject:
    return {
        "cpu": {"vcpus": vcpus},
        "memory": memory,
        "boot": {"payload": {"name": payload, "arg": arg}},
    }


def labels(node: JsonObject | None) -> dict[str, str]:
    return dict(((node or {}).get("metadata") or {}).get("labels") or {})


def runner_processes(directory_name: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"spanvm.agent.runner" in cmdline and any(
            directory_name.encode() in part for part in cmdline
        ):
            out.append(int(proc.name))
    return out


def test_agent_publishes_capabilities_and_keeps_its_lease_fresh(
    kube: Kube, nodes: SimulatedNodes
) -> None:
    node = wait_for(
        "the agent's labels",
        lambda: (n := kube.get_node("ag-a")) and KVM_LABEL in labels(n) and n,
    )
    assert node["metadata"]["labels"][KVM_LABEL] == "true"
    assert node["metadata"]["labels"]["spanvm.io/kvm-flavour"] in ("pvm", "intel", "amd")
    annotations = node["metadata"]["annotations"]
    assert annotations[ALLOCATABLE_VCPUS_ANNOTATION] == "1"  # --guest-vcpus of the simulation
    details = json.loads(annotations[DETAILS_ANNOTATION])
    assert details["kvm"]["usable"] is True and details["kvm"]["api_version"] == 12

    def renew_time() -> str:
        lease = kube.get_lease(SYSTEM_NS, agent_lease_name("ag-a"))
        return str((lease or {}).get("spec", {}).get("renewTime") or "")

    first = wait_for("the heartbeat Lease", renew_time)
    second = wait_for("a renewal", lambda: (t := renew_time()) != first and t)
    assert parse_time(second) > parse_time(first)  # type: ignore[operator]


def test_a_node_that_loses_kvm_becomes_unschedulable(
    kube: Kube, nodes: SimulatedNodes, tmp_path: Path
) -> None:
    device = tmp_path / "kvm"
    device.symlink_to("/dev/kvm")  # a device the test can take away while the agent runs
    nodes.stop_agent("ag-b")
    nodes.start_agent("ag-b", "--kvm-device", str(device))
    try:
        wait_for("KVM found", lambda: labels(kube.get_node("ag-b")).get(KVM_LABEL) == "true")
        device.unlink()  # the periodic re-check must notice
        node = wait_for(
            "the node marked without KVM",
            lambda: (n := kube.get_node("ag-b")) and labels(n).get(KVM_LABEL) == "false" and n,
        )
        assert node["metadata"]["annotations"][ALLOCATABLE_VCPUS_ANNOTATION] == "0"
        details = json.loads(node["metadata"]["annotations"][DETAILS_ANNOTATION])
        assert str(device) in details["kvm"]["error"]
        wait_for(  # the agent logs right after it patches the Node
            "the agent to log it", lambda: "KVM not usable" in nodes.log_of("ag-b").read_text()
        )
    finally:
        nodes.stop_agent("ag-b")
        nodes.start_agent("ag-b")
    wait_for(
        "KVM back after restart", lambda: labels(kube.get_node("ag-b")).get(KVM_LABEL) == "true"
    )


def test_a_fragment_runs_its_payload_running_then_succeeded(
    kube: Kube, nodes: SimulatedNodes
) -> None:
    (name,) = place(kube, "one", spec_of("memtest", 1, "64Mi", 250), ["ag-a"])
    running = wait_for("Running", lambda: phase(kube, name) == "Running" and fragment(kube, name))
    status = running["status"]
    assert status["pid"] > 0 and status["startedAt"]
    assert status["endpoint"].startswith(nodes.address_of("ag-a") + ":")
    done = wait_for(
        "Succeeded",
        lambda: phase(kube, name) in ("Succeeded", "Failed") and fragment(kube, name),
        timeout=60,
    )["status"]
    assert done["phase"] == "Succeeded", done
    assert done["exitCode"] == 0
    assert "passes=250" in done["consoleTail"] and "errors=0" in done["consoleTail"]


def place_pair(kube: Kube, name: str, spec: JsonObject) -> list[str]:
    """A 2-fragment VM on ag-a and ag-b, started as the operator would: fragment 1 waits
    until fragment 0's endpoint is passed on to it."""
    wait_for(
        "both nodes with KVM",
        lambda: all(labels(kube.get_node(n)).get(KVM_LABEL) == "true" for n in ("ag-a", "ag-b")),
    )
    names = place(kube, name, spec, ["ag-a", "ag-b"])
    placed = [
        FragmentSummary(name=n, node_name=node, vcpu_ids=[i], memory="0")
        for i, (n, node) in enumerate(zip(names, ["ag-a", "ag-b"], strict=True))
    ]
    wait_for(
        "fragment 0's endpoint",
        lambda: (fragment(kube, names[0]).get("status") or {}).get("endpoint"),
    )
    assert phase(kube, names[1]) in (None, "Pending")  # it must wait for its peer's endpoint
    share_peers(kube, name, placed)
    return names


def test_two_agents_run_a_two_fragment_vm(kube: Kube, nodes: SimulatedNodes) -> None:
    arg = 1 << 18
    names = place_pair(kube, "pair", spec_of("smp-sum", 2, "256Mi", arg))
    wait_for(
        "both fragments finished",
        lambda: all(phase(kube, n) in ("Succeeded", "Failed") for n in names),
        timeout=90,
    )
    statuses = [fragment(kube, n)["status"] for n in names]
    assert [s["phase"] for s in statuses] == ["Succeeded", "Succeeded"], statuses
    console = statuses[0]["consoleTail"]
    assert f"sum={smp_sum(arg)}" in console, console
    assert statuses[1]["endpoint"].startswith(nodes.address_of("ag-b"))
    assert statuses[1]["counters"]["pagesIn"] > 0  # memory really crossed the fabric


def test_agent_restart_adopts_the_running_fragment_and_a_killed_one_fails(
    kube: Kube, nodes: SimulatedNodes
) -> None:
    (name,) = place(kube, "long", spec_of("memtest", 1, "64Mi", 100_000), ["ag-a"])
    status = wait_for(
        "Running", lambda: phase(kube, name) == "Running" and fragment(kube, name)["status"]
    )
    pid = status["pid"]
    directory = next(d.name for d in (nodes.state_dir / "ag-a").iterdir() if "_long-0_" in d.name)
    assert len(runner_processes(directory)) == 1

    nodes.stop_agent("ag-a", kill=True)
    os.kill(pid, 0)  # the fragment outlives its agent
    nodes.start_agent("ag-a")
    wait_for(
        "the new agent to adopt", lambda: "adopted fragment" in nodes.log_of("ag-a").read_text()
    )
    time.sleep(3)  # a few sync passes of the new agent
    assert len(runner_processes(directory)) == 1  # no second launch
    assert fragment(kube, name)["status"]["pid"] == pid
    assert phase(kube, name) == "Running"

    os.kill(pid, signal.SIGKILL)
    failed = wait_for("Failed", lambda: phase(kube, name) == "Failed" and fragment(kube, name))
    assert "killed by SIGKILL" in failed["status"]["message"]


def test_deleting_a_fragment_stops_its_process(kube: Kube, nodes: SimulatedNodes) -> None:
    (name,) = place(kube, "gone", spec_of("memtest", 1, "64Mi", 100_000), ["ag-b"])
    pid = wait_for(
        "Running",
        lambda: phase(kube, name) == "Running" and fragment(kube, name)["status"]["pid"],
    )
    kube.delete_fragment(NS, name)

    def dead() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for("the fragment process to stop", dead, timeout=30)
    wait_for(
        "its state to be removed",
        lambda: not any("_gone-0_" in d.name for d in (nodes.state_dir / "ag-b").iterdir()),
    )


def test_an_agent_told_to_stops_its_fragments_when_it_stops(
    kube: Kube, nodes: SimulatedNodes
) -> None:
    """By default fragments outlive their agent (adoption, above); with
    --stop-fragments-on-exit the agent stops them on SIGTERM and waits for their runners."""
    nodes.stop_agent("ag-b")
    nodes.start_agent("ag-b", "--stop-fragments-on-exit")
    try:
        (name,) = place(kube, "with-agent", spec_of("spin", 1, "64Mi", 0), ["ag-b"])
        pid = wait_for(
            "Running",
            lambda: phase(kube, name) == "Running" and fragment(kube, name)["status"]["pid"],
        )
        directory = next(
            d for d in (nodes.state_dir / "ag-b").iterdir() if "_with-agent-0_" in d.name
        )
        nodes.stop_agent("ag-b")  # SIGTERM; the agent then has 10 s before SIGKILL
        assert not pid_alive(pid), "the fragment outlived an agent told to stop it"
        assert not runner_processes(directory.name)
        assert json.loads((directory / "exit.json").read_text()) == {"exit_code": 143}
        assert "stopping its fragments" in nodes.log_of("ag-b").read_text()
    finally:
        nodes.stop_agent("ag-b")
        nodes.start_agent("ag-b")
    wait_for("the next agent to report it Stopped", lambda: phase(kube, name) == "Stopped")


def test_the_first_cause_is_reported_not_how_the_process_ended(tmp_path: Path) -> None:
    """Issue 13 kind 11: a fragment that recorded a lost peer and was then killed by a signal
    on its way out is reported for the lost peer (the signal comes after, as such)."""
    state = tmp_path / "frag"
    state.mkdir()
    lines = [
        Listening(index=1, endpoint="10.0.0.2:7000"),
        Connected(index=1),
        Failed(error="fragment 0 lost: no message for 3.5s"),
    ]
    (state / STATUS).write_text("".join(e.model_dump_json() + "\n" for e in lines))
    (state / EXIT).write_text(json.dumps({"exit_code": None, "signal": "SIGUSR1"}))
    status = FragmentProcess(state).status(1)
    assert status.phase == "Failed"
    assert status.message == (
        "fragment 0 lost: no message for 3.5s (then the fragment VMM killed by SIGUSR1)"
    )
    (state / STATUS).write_text(lines[0].model_dump_json() + "\n")  # nothing recorded: the signal
    assert FragmentProcess(state).status(1).message == "fragment VMM killed by SIGUSR1"


def linux_spec(kernel: str, cmdline: str) -> JsonObject:
    return {
        "cpu": {"vcpus": 1},
        "memory": "64Mi",
        "placement": {"maxFragments": 1},
        "boot": {"linux": {"kernel": kernel, "cmdline": cmdline}},
    }


def test_a_linux_kernel_on_the_node_boots_through_the_agent(
    kube: Kube, nodes: SimulatedNodes
) -> None:
    """boot.linux reaches the fragment VMM: the project's ring-0 probe kernel, entered through
    the Linux boot protocol, prints the command line the SpanningVM gave it."""
    spec = linux_spec(str(kernel_path("zeropage-probe")), "probe via the agent")
    (name,) = place(kube, "linux-boot", spec, ["ag-a"])
    done = wait_for(
        "Succeeded",
        lambda: phase(kube, name) in ("Succeeded", "Failed") and fragment(kube, name),
        timeout=120,
    )["status"]
    assert done["phase"] == "Succeeded", done
    assert "cmdline probe via the agent" in done["consoleTail"]
    assert "acpi_table APIC" in done["consoleTail"] and done["consoleTail"].rstrip().endswith(
        "done"
    )


def test_a_linux_kernel_missing_on_the_node_fails_naming_node_and_path(
    kube: Kube, nodes: SimulatedNodes
) -> None:
    (name,) = place(kube, "linux-missing", linux_spec("/nonexistent/vmlinux", ""), ["ag-b"])
    done = wait_for(
        "Failed", lambda: phase(kube, name) == "Failed" and fragment(kube, name), timeout=60
    )["status"]
    assert "boot.linux.kernel /nonexistent/vmlinux: no such file on node ag-b" in done["message"]


def test_pausing_holds_the_vcpus_while_the_fabric_keeps_serving(
    kube: Kube, nodes: SimulatedNodes
) -> None:
    """desiredState Paused (what the operator writes for `spanvm pause`): each agent holds its
    fragment's vCPUs and reports Paused; the guest's console stops growing, no fragment takes
    the other for lost (heartbeats go on past the fabric's 10 s hung-peer limit), and Running
    again resumes the guest where it was. Every phase is an Event from the agent."""
    names = place_pair(kube, "pause", spec_of("console-remote", 2, "64Mi", 1_000_000_000))
    wait_for("both Running", lambda: all(phase(kube, n) == "Running" for n in names), timeout=60)

    def console_bytes() -> int:
        return int((fragment(kube, names[0]).get("status") or {}).get("consoleBytes") or 0)

    before = wait_for("console output", lambda: console_bytes() or None)
    wait_for("more console output", lambda: console_bytes() > before)
    for name in names:
        kube.patch_fragment(NS, name, {"spec": {"desiredState": "Paused"}})
    wait_for("both Paused", lambda: all(phase(kube, n) == "Paused" for n in names), timeout=30)
    time.sleep(3)  # any output in flight when the vCPUs stopped has been reported
    held = console_bytes()
    time.sleep(12)  # longer than the fabric's hung-peer limit (10 s)
    assert [phase(kube, n) for n in names] == ["Paused", "Paused"]
    assert console_bytes() == held  # guest time stood still
    for name in names:
        kube.patch_fragment(NS, name, {"spec": {"desiredState": "Running"}})
    wait_for("both Running again", lambda: all(phase(kube, n) == "Running" for n in names))
    wait_for("the guest to go on", lambda: console_bytes() > held, timeout=30)

    events = kube.core.list_namespaced_event(
        NS, field_selector=f"involvedObject.name={names[1]}"
    ).items
    seen = {(e.reason, e.reporting_component, e.reporting_instance) for e in events}
    assert ("FabricConnected", "spanvm-agent", "ag-b") in seen, seen
    assert ("Paused", "spanvm-agent", "ag-b") in seen, seen
    for name in names:
        kube.delete_fragment(NS, name)
