"""The lifecycle as a table: situations (VM phase and runStrategy, fragment states, node
states) in, actions out. Pure: no API server, no clock. A worked table of the situations
that matter, then every combination of phase x runStrategy x fragments x nodes against the
rules that must hold whatever the situation."""

import copy
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from spanvm.api.phases import FINISHED_VM_PHASES, STARTED_VM_PHASES, VMPhase
from spanvm.api.spanningvm import FragmentSummary, SpanningVMSpec
from spanvm.controller import lifecycle as lc
from spanvm.controller.cluster_view import NodeHealth
from spanvm.controller.fragments import fragment_bodies, hold_back_peers, peers_of
from spanvm.kube import JsonObject
from spanvm.rfc3339 import format_time

GRACE = 40.0
MISSING = None
NO_PLACEMENT = "no placement"


def vm(phase: str | None, strategy: str, placed: bool = True) -> JsonObject:
    status: JsonObject = {}
    if phase is not None:
        status["phase"] = phase
    if placed:
        status["fragments"] = [
            {"name": f"vm-{i}", "nodeName": n, "vcpuIds": [i], "memory": "128Mi"}
            for i, n in enumerate(("a", "b"))
        ]
    return {
        "apiVersion": "spanvm.io/v1alpha1",
        "kind": "SpanningVM",
        "metadata": {"name": "vm", "namespace": "ns", "uid": "u1", "generation": 1},
        "spec": {
            "cpu": {"vcpus": 2},
            "memory": "256Mi",
            "boot": {"payload": {"name": "spin"}},
            "runStrategy": strategy,
        },
        "status": status,
    }


def fragments(*states: str | None) -> dict[int, JsonObject]:
    out = {}
    for i, state in enumerate(states):
        if state is MISSING:
            continue
        status: JsonObject = {"phase": state, "endpoint": f"10.0.0.{i}:7000"}
        out[i] = {
            "metadata": {
                "name": f"vm-{i}",
                "namespace": "ns",
                "labels": {
                    "spanvm.io/vm": "vm",
                    "spanvm.io/node": "ab"[i],
                    "spanvm.io/fragment-index": str(i),
                },
                "ownerReferences": [{"uid": "u1"}],
            },
            "spec": {"index": i, "nodeName": "ab"[i], "homeMemory": []},
            "status": status,
        }
    return out


def nodes(state: str) -> lc.Nodes:
    """healthy; `b-brief`/`b-long`: node b lost for a moment/past the grace; `b-deleted`;
    `both-long`: both lost past the grace."""
    ok, lost = NodeHealth("a", True), NodeHealth("b", False, "node b is NotReady")
    health = {"a": ok, "b": NodeHealth("b", True)}
    lost_for: dict[str, float] = {}
    if state in ("b-brief", "b-long"):
        health["b"] = lost
        lost_for["b"] = 1.0 if state == "b-brief" else GRACE + 1
    elif state == "b-deleted":
        del health["b"]
    elif state == "both-long":
        health = {"a": NodeHealth("a", False, "node a is NotReady"), "b": lost}
        lost_for = {"a": GRACE + 1, "b": GRACE + 1}
    return lc.Nodes(health=health, lost_for=lost_for, loss_grace=GRACE)


def kinds(actions: list[lc.Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def written(actions: list[lc.Action]) -> dict[str, Any]:
    """Every status key written, the last write winning."""
    out: dict[str, Any] = {}
    for a in actions:
        if isinstance(a, lc.WriteStatus):
            out.update(a.changes)
    return out


def with_peers(frags: dict[int, JsonObject], vm_obj: JsonObject) -> dict[int, JsonObject]:
    """Fragments whose peers the operator has already filled (no PatchFragment due)."""
    placed = [FragmentSummary.model_validate(e) for e in vm_obj["status"]["fragments"]]
    peers = peers_of(placed, frags)
    for f in frags.values():
        f["spec"]["peers"] = peers
    return frags


# phase, runStrategy, fragments (NO_PLACEMENT: none recorded), nodes -> action kinds, phase
TABLE: list[tuple[str | None, str, tuple[str | None, ...] | str, str, list[str], str | None]] = [
    (None, "Once", NO_PLACEMENT, "healthy", ["Place"], None),
    ("Pending", "Always", NO_PLACEMENT, "healthy", ["Place"], None),
    ("Scheduling", "Once", (MISSING, MISSING), "healthy", ["Materialise"], None),
    ("Scheduling", "Once", ("Pending", MISSING), "healthy", ["Materialise"], None),
    (
        "Scheduling",
        "Once",
        ("Pending", "Pending"),
        "healthy",
        ["PostEvent", "WriteStatus"],
        "Starting",
    ),
    (
        "Starting",
        "Once",
        ("Running", "Running"),
        "healthy",
        ["PostEvent", "WriteStatus"],
        "Running",
    ),
    ("Running", "Once", ("Running", "Running"), "healthy", ["WriteStatus"], "Running"),
    (
        "Running",
        "Once",
        ("Failed", "Running"),
        "healthy",
        ["AskStop", "PostEvent", "CountFailure", "WriteStatus"],
        "Failed",
    ),
    (
        "Running",
        "Always",
        ("Failed", "Running"),
        "healthy",
        ["PostEvent", "CountRestart", "DeleteFragments", "WriteStatus"],
        "Pending",
    ),
    (
        "Running",
        "Always",
        ("Running", "Running"),
        "b-brief",
        ["PostEvent", "WriteStatus"],
        "Degraded",
    ),
    # lost past the grace, but fragment 0 on a healthy node still runs: the fabric vouches
    (
        "Running",
        "Always",
        ("Running", "Running"),
        "b-long",
        ["PostEvent", "WriteStatus"],
        "Degraded",
    ),
    (
        "Running",
        "Always",
        ("Running", "Running"),
        "b-deleted",
        ["PostEvent", "WriteStatus"],
        "Degraded",
    ),
    (
        "Degraded",
        "Always",
        ("Running", "Running"),
        "both-long",
        ["PostEvent", "CountRestart", "DeleteFragments", "WriteStatus"],
        "Pending",
    ),
    ("Degraded", "Once", ("Running", "Running"), "both-long", ["WriteStatus"], "Degraded"),
    (
        "Running",
        "Once",
        ("Running", MISSING),
        "healthy",
        ["AskStop", "PostEvent", "CountFailure", "WriteStatus"],
        "Failed",
    ),
    (
        "Running",
        "Always",
        ("Running", MISSING),
        "healthy",
        ["PostEvent", "CountRestart", "DeleteFragments", "WriteStatus"],
        "Pending",
    ),
    ("Succeeded", "Once", ("Succeeded", "Running"), "healthy", ["AskStop"], None),
    ("Succeeded", "Once", ("Succeeded", "Stopped"), "healthy", [], None),
    ("Failed", "Once", ("Failed", MISSING), "b-deleted", [], None),
    # fragment 0 ends the guest before fragment 1 hears of it: still Running
    ("Running", "Once", ("Succeeded", "Running"), "healthy", ["WriteStatus"], "Running"),
    ("Running", "Halted", ("Running", "Running"), "healthy", ["AskStop", "WriteStatus"], None),
    (
        "Running",
        "Halted",
        ("Stopped", "Stopped"),
        "healthy",
        ["DeleteFragments", "WriteStatus"],
        "Stopped",
    ),
    ("Stopped", "Halted", NO_PLACEMENT, "healthy", ["WriteStatus"], "Stopped"),
    # KubeVirt's Always: a guest that exits 0 is restarted too (it used to stay Succeeded)
    (
        "Running",
        "Always",
        ("Succeeded", "Stopped"),
        "healthy",
        ["PostEvent", "CountRestart", "DeleteFragments", "WriteStatus"],
        "Pending",
    ),
    (
        "Succeeded",
        "Always",
        ("Succeeded", "Stopped"),
        "healthy",
        ["PostEvent", "CountRestart", "DeleteFragments", "WriteStatus"],
        "Pending",
    ),
    # RerunOnFailure: restarted after a failure, final after exit 0
    (
        "Running",
        "RerunOnFailure",
        ("Failed", "Running"),
        "healthy",
        ["PostEvent", "CountRestart", "DeleteFragments", "WriteStatus"],
        "Pending",
    ),
    (
        "Running",
        "RerunOnFailure",
        ("Succeeded", "Stopped"),
        "healthy",
        ["PostEvent", "WriteStatus"],
        "Succeeded",
    ),
    ("Succeeded", "RerunOnFailure", ("Succeeded", "Stopped"), "healthy", [], None),
    (
        "Degraded",
        "RerunOnFailure",
        ("Running", "Running"),
        "both-long",
        ["PostEvent", "CountRestart", "DeleteFragments", "WriteStatus"],
        "Pending",
    ),
    # Manual: not started until spanvm start, never restarted by the operator
    (None, "Manual", NO_PLACEMENT, "healthy", ["WriteStatus"], "Stopped"),
    # a Manual guest that fails stays Failed (it ran on when its strategy became Manual)
    (
        "Running",
        "Manual",
        ("Failed", "Running"),
        "healthy",
        ["AskStop", "PostEvent", "CountFailure", "WriteStatus"],
        "Failed",
    ),
    (
        "Pending",
        "Always",
        NO_PLACEMENT + " with old fragments",
        "healthy",
        ["DeleteFragments", "WriteStatus"],
        "Pending",
    ),
]


@pytest.mark.parametrize(
    ("phase", "strategy", "states", "node_state", "expected", "new_phase"), TABLE
)
def test_the_table(  # noqa: PLR0917 - one parameter per column of the table
    phase: str | None,
    strategy: str,
    states: tuple[str | None, ...] | str,
    node_state: str,
    expected: list[str],
    new_phase: str | None,
) -> None:
    if isinstance(states, str):
        vm_obj = vm(phase, strategy, placed=False)
        frags = fragments("Stopped", "Running") if "old" in states else {}
    else:
        vm_obj = vm(phase, strategy)
        frags = with_peers(fragments(*states), vm_obj)
    actions = lc.decide(vm_obj, frags, nodes(node_state))
    assert kinds(actions) == expected, actions
    assert written(actions).get("phase") == new_phase, actions


def test_a_restart_counts_and_clears_the_placement() -> None:
    vm_obj = vm("Running", "Always")
    vm_obj["status"]["restarts"] = 2
    actions = lc.decide(
        vm_obj, with_peers(fragments("Failed", "Running"), vm_obj), nodes("healthy")
    )
    status = written(actions)
    assert status["restarts"] == 3
    assert status["fragments"] is None and status["nodes"] is None
    (delete,) = [a for a in actions if isinstance(a, lc.DeleteFragments)]
    assert delete.names == ("vm-0", "vm-1")


def test_peers_are_filled_once_every_fragment_exists() -> None:
    vm_obj = vm("Scheduling", "Once")
    actions = lc.decide(vm_obj, fragments("Pending", "Pending"), nodes("healthy"))
    patches = [a for a in actions if isinstance(a, lc.PatchFragment)]
    assert [p.name for p in patches] == ["vm-0", "vm-1"]
    peers = patches[0].patch["spec"]["peers"]
    assert [p["endpoint"] for p in peers] == ["10.0.0.0:7000", "10.0.0.1:7000"]


def test_fragments_are_created_with_the_peers_known_so_none_is_patched_for_its_peers() -> None:
    vm_obj = vm("Scheduling", "Once")
    placed = [FragmentSummary.model_validate(e) for e in vm_obj["status"]["fragments"]]
    spec = SpanningVMSpec.model_validate(vm_obj["spec"])

    def created(bodies: dict[int, JsonObject]) -> dict[int, JsonObject]:
        return {i: {**b, "status": {"phase": "Pending"}} for i, b in bodies.items()}

    def patched(frags: dict[int, JsonObject]) -> list[str]:
        actions = lc.decide(vm_obj, frags, nodes("healthy"))
        return [a.name for a in actions if isinstance(a, lc.PatchFragment)]

    assert patched(created(fragment_bodies(vm_obj, spec, placed, {}))) == []
    # fragment 0 exists and reported its endpoint: fragment 1 is created knowing it; only
    # fragment 0 (created before 1 existed) still needs its peers
    first = created(fragment_bodies(vm_obj, spec, placed, {}))[0]
    first["status"]["endpoint"] = "10.0.0.0:7000"
    second = created(fragment_bodies(vm_obj, spec, placed, {0: first}))
    assert second[1]["spec"]["peers"][0]["endpoint"] == "10.0.0.0:7000"
    assert patched({0: first, **second}) == ["vm-0"]


def test_fragment_0_comes_last_and_knows_its_peers_only_once_every_other_exists() -> None:
    vm_obj = vm("Scheduling", "Once")
    placed = [FragmentSummary.model_validate(e) for e in vm_obj["status"]["fragments"]]
    spec = SpanningVMSpec.model_validate(vm_obj["spec"])
    bodies = fragment_bodies(vm_obj, spec, placed, {})
    assert list(bodies) == [1, 0]
    hold_back_peers(bodies[0], set(), len(placed))  # fragment 1 could not be created
    assert "peers" not in bodies[0]["spec"]
    again = fragment_bodies(vm_obj, spec, placed, {})[0]
    hold_back_peers(again, {1}, len(placed))
    assert again["spec"]["peers"]
    # fragments other than 0 keep theirs: they wait for fragment 0's endpoint anyway
    hold_back_peers(bodies[1], set(), len(placed))
    assert bodies[1]["spec"]["peers"]


def test_an_invalid_spec_fails_the_vm() -> None:
    vm_obj = vm("Pending", "Once")
    vm_obj["spec"]["cpu"]["vcpus"] = 0
    (action,) = lc.decide(vm_obj, {}, nodes("healthy"))
    assert isinstance(action, lc.WriteStatus)
    assert action.changes["phase"] == VMPhase.FAILED
    assert "invalid spec" in action.changes["message"]


def deleting(waited: float) -> tuple[JsonObject, datetime]:
    vm_obj = vm("Running", "Once")
    now = datetime(2026, 1, 1, tzinfo=UTC)
    vm_obj["metadata"]["deletionTimestamp"] = format_time(now - timedelta(seconds=waited))
    return vm_obj, now


def test_deletion_waits_for_fragments_then_forces_after_the_grace() -> None:
    vm_obj, now = deleting(5)
    waiting = lc.decide_deletion(vm_obj, fragments("Running", "Stopped"), now, 60)
    assert kinds(waiting) == ["AskStop", "WriteStatus", "WaitForStop"]
    assert "vm-0 on a" in waiting[-1].message  # type: ignore[union-attr]
    vm_obj, now = deleting(61)
    forced = lc.decide_deletion(vm_obj, fragments("Running", "Stopped"), now, 60)
    assert kinds(forced) == ["AskStop", "WriteStatus", "PostEvent", "DeleteFragments"]
    done = lc.decide_deletion(vm_obj, fragments("Stopped", "Failed"), now, 60)
    assert kinds(done) == ["DeleteFragments"]


PHASES = [None, *VMPhase]
STRATEGIES = ["Once", "Always", "RerunOnFailure", "Manual", "Halted"]
FRAGMENT_STATES: list[tuple[str | None, ...] | str] = [
    NO_PLACEMENT,
    (MISSING, MISSING),
    ("Pending", MISSING),
    ("Pending", "Pending"),
    ("Starting", "Running"),
    ("Running", "Running"),
    ("Failed", "Running"),
    ("Succeeded", "Stopping"),
    ("Succeeded", "Stopped"),
    ("Stopped", "Stopped"),
    ("Running", MISSING),
]
NODE_STATES = ["healthy", "b-brief", "b-long", "b-deleted", "both-long"]


@pytest.mark.parametrize(("phase", "strategy"), list(itertools.product(PHASES, STRATEGIES)))
def test_every_situation_keeps_the_rules(phase: str | None, strategy: str) -> None:
    for states, node_state in itertools.product(FRAGMENT_STATES, NODE_STATES):
        placed = not isinstance(states, str)
        vm_obj = vm(phase, strategy, placed=placed)
        frags = fragments(*states) if placed else {}
        before = copy.deepcopy((vm_obj, frags))
        actions = lc.decide(vm_obj, frags, nodes(node_state))
        case = f"{phase} {strategy} {states} {node_state}: {kinds(actions)}"
        assert (vm_obj, frags) == before, f"decide changed its input: {case}"
        assert actions == lc.decide(vm_obj, frags, nodes(node_state)), case
        names = {f["metadata"]["name"] for f in frags.values()}
        for a in actions:
            if isinstance(a, lc.AskStop | lc.DeleteFragments):
                assert set(a.names) <= names, case
                assert a.names, case
            if isinstance(a, lc.PatchFragment):
                assert a.name in names, case
            if isinstance(a, lc.Place):
                assert not placed and not frags, case
                assert strategy not in ("Halted", "Manual"), case  # Manual waits for start
            if isinstance(a, lc.Materialise):
                assert phase not in STARTED_VM_PHASES | FINISHED_VM_PHASES, case
            if isinstance(a, lc.CountRestart):
                assert strategy in ("Always", "RerunOnFailure"), case
        new_phase = written(actions).get("phase")
        assert new_phase is None or new_phase in set(VMPhase), case
        if strategy == "Halted" or (strategy == "Manual" and not placed):
            assert new_phase in (None, VMPhase.STOPPED), case  # Manual: no start request
        final = strategy == "Once" or (strategy == "RerunOnFailure" and phase == "Succeeded")
        if final and phase in FINISHED_VM_PHASES:
            assert set(kinds(actions)) <= {"AskStop"}, case
        if strategy == "Once" and new_phase == VMPhase.PENDING:
            assert phase not in STARTED_VM_PHASES, case  # Once never restarts a guest


def test_halted_leaves_no_stale_condition_or_count() -> None:
    """After Halted, FabricReady used to say "waiting for fragments 0 (Starting)..." with an
    old observedGeneration, and FRAGMENTS stayed 2 while NODES was empty."""
    vm_obj = vm("Running", "Halted")
    actions = lc.decide(vm_obj, fragments("Stopped", "Stopped"), nodes("healthy"))
    status = written(actions)
    assert status["phase"] == "Stopped"
    assert status["fragmentCount"] is None and status["nodes"] is None
    (write,) = [a for a in actions if isinstance(a, lc.WriteStatus)]
    conditions = {c[0]: c for c in write.conditions}
    assert set(conditions) == {"Scheduled", "FabricReady", "Ready"}
    assert all(c[1] is False and c[2] == "Halted" for c in conditions.values())


def test_the_ready_reason_says_why_not_the_phase() -> None:
    vm_obj = vm("Starting", "Once")
    actions = lc.decide(
        vm_obj, with_peers(fragments("Running", "Running"), vm_obj), nodes("healthy")
    )
    (write,) = [a for a in actions if isinstance(a, lc.WriteStatus)]
    ready = next(c for c in write.conditions if c[0] == "Ready")
    assert ready[1:3] == (True, "GuestRunning")


def annotated(vm_obj: JsonObject, **annotations: str) -> JsonObject:
    vm_obj["metadata"]["annotations"] = annotations
    return vm_obj


def test_requests_start_stop_and_restart_a_manual_vm() -> None:
    started = annotated(vm("Stopped", "Manual", placed=False), **{"spanvm.io/request": "start/1"})
    actions = lc.decide(started, {}, nodes("healthy"))
    status = written(actions)
    assert status["phase"] == "Pending" and status["lastRequest"] == "start/1"
    assert status["restarts"] is None and "CountRestart" not in kinds(actions)  # a start
    assert "StartRequested" in {a.reason for a in actions if isinstance(a, lc.PostEvent)}
    started["status"]["lastRequest"] = "start/1"
    assert kinds(lc.decide(started, {}, nodes("healthy"))) == ["Place"]

    stopping = annotated(vm("Running", "Manual"), **{"spanvm.io/request": "stop/2"})
    actions = lc.decide(stopping, fragments("Running", "Running"), nodes("healthy"))
    assert kinds(actions) == ["AskStop", "WriteStatus"]
    assert written(actions)["lastRequest"] == "stop/2"

    again = annotated(vm("Running", "Once"), **{"spanvm.io/request": "restart/3"})
    again["status"]["restarts"] = 1
    again["status"]["startFailure"] = {"consecutiveFailCount": 4}
    actions = lc.decide(again, fragments("Running", "Running"), nodes("healthy"))
    status = written(actions)
    assert status["restarts"] == 2 and status["lastRequest"] == "restart/3"
    assert status["startFailure"] is None and status["exitCode"] is None


def test_failures_in_a_row_back_off() -> None:
    """The first failure restarts at once; the next waits 10 s (CrashLoopBackOff), then 20 s."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    clock = lc.Nodes(health=nodes("healthy").health, now=now, backoff_base=10.0)
    vm_obj = vm("Running", "Always")
    first = written(lc.decide(vm_obj, with_peers(fragments("Failed", "Running"), vm_obj), clock))
    assert first["phase"] == "Pending"
    assert first["startFailure"] == {"consecutiveFailCount": 1, "retryAfterTimestamp": None}

    vm_obj["status"]["startFailure"] = first["startFailure"]
    actions = lc.decide(vm_obj, with_peers(fragments("Failed", "Running"), vm_obj), clock)
    assert "DeleteFragments" not in kinds(actions)
    second = written(actions)
    assert second["phase"] == "Failed" and "CrashLoopBackOff" in second["message"]
    retry = {"consecutiveFailCount": 2, "retryAfterTimestamp": "2026-01-01T00:00:10Z"}
    assert second["startFailure"] == retry
    (write,) = [a for a in actions if isinstance(a, lc.WriteStatus)]
    assert next(c for c in write.conditions if c[0] == "Ready")[2] == "CrashLoopBackOff"

    vm_obj["status"].update(phase="Failed", startFailure=retry)
    waiting = lc.decide(vm_obj, with_peers(fragments("Failed", "Stopped"), vm_obj), clock)
    assert "CountRestart" not in kinds(waiting) and "PostEvent" not in kinds(waiting)
    later = lc.Nodes(health=clock.health, now=now + timedelta(seconds=11))
    due = written(lc.decide(vm_obj, with_peers(fragments("Failed", "Stopped"), vm_obj), later))
    assert due["phase"] == "Pending"
    assert due["startFailure"] == {"consecutiveFailCount": 2, "retryAfterTimestamp": None}


def test_pausing_is_passed_to_every_fragment() -> None:
    vm_obj = annotated(vm("Running", "Once"), **{"spanvm.io/paused": "true"})
    frags = with_peers(fragments("Running", "Running"), vm_obj)
    patches = [
        a for a in lc.decide(vm_obj, frags, nodes("healthy")) if isinstance(a, lc.PatchFragment)
    ]
    assert [(p.name, p.patch["spec"]["desiredState"]) for p in patches] == [
        ("vm-0", "Paused"),
        ("vm-1", "Paused"),
    ]
    paused = with_peers(fragments("Paused", "Paused"), vm_obj)
    for f in paused.values():
        f["spec"]["desiredState"] = "Paused"
    actions = lc.decide(vm_obj, paused, nodes("healthy"))
    (write,) = [a for a in actions if isinstance(a, lc.WriteStatus)]
    assert next(c for c in write.conditions if c[0] == "Ready")[1:3] == (False, "Paused")
    assert write.changes["phase"] == "Running"
