"""The lifecycle of a SpanningVM as a pure function: what the operator does next.

`decide(vm, fragments, nodes)` reads the VM object, its own fragments (by index) and the
nodes' health, and returns the actions that bring the VM a step closer to its spec; no I/O,
no clock of its own (how long a node has been lost, and the time CrashLoopBackOff's retry is
weighed against, are part of `nodes`). `decide_deletion` does the same
for a VM being deleted. `reconcile.py` carries the actions out. In order:

1. an invalid spec fails the VM;
2. not to run (Halted, a stop request, Manual before its first start): stop every fragment,
   delete them once stopped, phase Stopped, every condition and count saying so;
3. a restart request, or a start request for a guest that is not running: run it anew;
4. finished (Succeeded/Failed) and its runStrategy does not restart it (Once, Manual,
   RerunOnFailure after exit 0): final, only what still runs is asked to stop;
5. a failed fragment, a node lost past the grace that the fabric does not vouch for, or a
   guest that finished: restart if the runStrategy says so (Always after any end,
   RerunOnFailure after a failure; spanvm.controller.run_strategy), after the
   CrashLoopBackOff delay when failures come in a row;
6. a fragment missing under a started guest: a failure (restarted or failed as above);
7. no placement: old fragments go first, then Place;
8. placed, fragments missing: Materialise (the executor decides again once they exist);
9. all there: peers, labels and pause, then the status from the fragments.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import ValidationError

from spanvm.api.constants import PAUSED_ANNOTATION
from spanvm.api.phases import (
    FINISHED_VM_PHASES,
    STARTED_VM_PHASES,
    TERMINAL_FRAGMENT_PHASES,
    ConditionType,
    DesiredState,
    FragmentPhase,
    Reason,
    RunStrategy,
    VMPhase,
)
from spanvm.api.spanningvm import FragmentSummary, SpanningVMSpec
from spanvm.controller.cluster_view import NodeHealth
from spanvm.controller.fragments import fabric_vouches, fragment_labels, peers_of
from spanvm.controller.run_strategy import (
    BACKOFF_BASE,
    Request,
    backoff,
    pending_request,
    restarts_after,
    wants_running,
)
from spanvm.controller.status import aggregate
from spanvm.controller.status_write import ConditionSpec
from spanvm.kube import JsonObject
from spanvm.rfc3339 import format_time, parse_time


# -- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WriteStatus:
    """Merge these keys into status (None removes one) and set these conditions."""

    changes: JsonObject
    conditions: tuple[ConditionSpec, ...] = ()


@dataclass(frozen=True)
class PostEvent:
    """A Kubernetes Event on the VM."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class AskStop:
    """Set desiredState Stopped on these fragments."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class DeleteFragments:
    """Delete these fragments."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class PatchFragment:
    """Merge-patch one fragment (peers, labels)."""

    name: str
    patch: JsonObject


@dataclass(frozen=True)
class Place:
    """Schedule the VM and record the placement (the executor holds the global lock)."""


@dataclass(frozen=True)
class Materialise:
    """Create the fabric Secret and every missing fragment of the recorded placement."""

    placed: tuple[FragmentSummary, ...]


@dataclass(frozen=True)
class CountFailure:
    """spanvm_vm_failures_total{reason}."""

    reason: str


@dataclass(frozen=True)
class CountRestart:
    """spanvm_vm_restarts_total."""


@dataclass(frozen=True)
class WaitForStop:
    """Deletion must wait: fragments are still stopping."""

    message: str


Action = (
    WriteStatus
    | PostEvent
    | AskStop
    | DeleteFragments
    | PatchFragment
    | Place
    | Materialise
    | CountFailure
    | CountRestart
    | WaitForStop
)


@dataclass(frozen=True)
class Nodes:
    """The nodes as the lifecycle needs them: health by name and, for each lost node, how
    long (seconds, on the operator's clock) it has been seen lost."""

    health: dict[str, NodeHealth] = field(default_factory=dict)
    lost_for: dict[str, float] = field(default_factory=dict)
    loss_grace: float = 40.0
    # The operator's wall clock for CrashLoopBackOff's retry time (None: restart at once)
    # and the back-off before the second restart in a row.
    now: datetime | None = None
    backoff_base: float = BACKOFF_BASE

    def lost_long(self, node: str) -> bool:
        if node not in self.health:
            return True  # a deleted node is lost at once
        return self.lost_for.get(node, 0.0) >= self.loss_grace


# -- helpers ---------------------------------------------------------------------------------
def _status(vm: JsonObject) -> JsonObject:
    return vm.get("status") or {}


def fragment_phase(fragment: JsonObject | None) -> str:
    return str(((fragment or {}).get("status") or {}).get("phase") or FragmentPhase.PENDING)


def terminal(fragment: JsonObject) -> bool:
    return fragment_phase(fragment) in TERMINAL_FRAGMENT_PHASES


def _name(fragment: JsonObject) -> str:
    return str(fragment["metadata"]["name"])


def ask_stop(fragments: dict[int, JsonObject]) -> list[Action]:
    """Stop what still runs and was not asked yet (nothing: no action)."""
    names = tuple(
        _name(f)
        for _, f in sorted(fragments.items())
        if not terminal(f) and f["spec"].get("desiredState") != DesiredState.STOPPED
    )
    return [AskStop(names)] if names else []


def delete_all(fragments: dict[int, JsonObject]) -> list[Action]:
    names = tuple(_name(f) for _, f in sorted(fragments.items()))
    return [DeleteFragments(names)] if names else []


def _placed(vm: JsonObject) -> list[FragmentSummary]:
    return [FragmentSummary.model_validate(e) for e in _status(vm).get("fragments") or []]


# -- the pass --------------------------------------------------------------------------------
def decide(vm: JsonObject, fragments: dict[int, JsonObject], nodes: Nodes) -> list[Action]:
    """The next actions for a VM that is not being deleted."""
    status = _status(vm)
    phase = status.get("phase")
    try:
        spec = SpanningVMSpec.model_validate(vm["spec"])
    except ValidationError as err:
        return [WriteStatus({"phase": VMPhase.FAILED, "message": f"invalid spec: {err}"})]
    placed = _placed(vm)
    strategy = spec.run_strategy
    request = pending_request(vm)
    runs, why_not = wants_running(strategy, vm)
    if not runs:
        return halt(fragments, why_not, request)
    if request is not None and request.verb in ("start", "restart"):
        if request.verb == "restart" or phase in FINISHED_VM_PHASES | {VMPhase.STOPPED}:
            return rerun(vm, fragments, request)
        return [WriteStatus({"lastRequest": request.value})]  # started already: nothing to do
    finished = phase in FINISHED_VM_PHASES
    if finished and not restarts_after(strategy, failed=phase == VMPhase.FAILED):
        # Final: what still runs is stopped, nothing is re-created or relaunched, the
        # status (phase, first cause, exit code) stays as it was when the guest ended.
        return ask_stop(fragments)
    if placed and len(fragments) == len(placed):
        agg = aggregate(placed, fragments, nodes.health)
        # A node briefly NotReady (or an agent briefly silent) is no reason to kill the
        # guest: if the node is really gone the fabric fails the VM soon. Fragments on
        # healthy nodes still Running vouch for the rest, however long the loss lasts.
        lost = [n for n in agg.lost_nodes if nodes.lost_long(n)]
        if lost and fabric_vouches(placed, fragments, nodes.health):
            lost = []
        if agg.failed or lost:
            if restarts_after(strategy, failed=True):
                return restart_after_end(vm, fragments, agg.message, failed=True, nodes=nodes)
        elif agg.phase == VMPhase.SUCCEEDED and restarts_after(strategy, failed=False):
            return restart_after_end(vm, fragments, agg.message, failed=False, nodes=nodes)
    missing = [p.name for i, p in enumerate(placed) if i not in fragments]
    if missing and phase in STARTED_VM_PHASES | FINISHED_VM_PHASES:
        # A fragment deleted under a started guest took part of it along: re-creating it
        # would relaunch a fragment into a guest that has lost its state.
        why = f"fragment(s) {', '.join(missing)} deleted after the guest started"
        if restarts_after(strategy, failed=True):
            return restart_after_end(vm, fragments, why, failed=True, nodes=nodes)
        return fail(fragments, why)
    if not placed:
        if fragments:  # the previous run's fragments must go before a new placement
            return [
                *delete_all(fragments),
                WriteStatus({"phase": VMPhase.PENDING, "message": "removing old fragments"}),
            ]
        return [Place()]
    if missing:
        return [Materialise(tuple(placed))]
    return [*peers_and_labels(vm, placed, fragments), *report(vm, placed, fragments, nodes)]


def placed_status(placed: Sequence[FragmentSummary]) -> list[Action]:
    """What recording a new placement writes (before any fragment exists)."""
    nodes_text = ", ".join(f"{p.node_name} (vCPUs {p.vcpu_ids})" for p in placed)
    message = f"placed on {nodes_text}"
    return [
        WriteStatus(
            {
                "phase": VMPhase.SCHEDULING,
                "fragments": [p.to_api() for p in placed],
                "fragmentCount": len(placed),
                "nodes": ",".join(p.node_name for p in placed),
                "message": message,
            },
            ((ConditionType.SCHEDULED, True, Reason.PLACED, message),),
        ),
        PostEvent("Normal", Reason.SCHEDULED, message),
    ]


def unschedulable(vm: JsonObject, message: str) -> list[Action]:
    """The scheduler found no room: Pending with its reason (an Event when it changes)."""
    event: list[Action] = []
    if _status(vm).get("message") != message:
        event = [PostEvent("Warning", Reason.UNSCHEDULABLE, message)]
    return [
        *event,
        WriteStatus(
            {"phase": VMPhase.PENDING, "message": message},
            (
                (ConditionType.SCHEDULED, False, Reason.UNSCHEDULABLE, message),
                (ConditionType.READY, False, VMPhase.PENDING, message),
            ),
        ),
    ]


def name_taken(vm: JsonObject, kind: str, others: Sequence[JsonObject]) -> list[Action]:
    """Names this VM needs are held by objects (their metadata) it does not own: say whose,
    and wait. An object of an earlier SpanningVM of the same name is garbage-collected in
    time; any other must be removed or renamed by whoever made it."""
    vm_name = vm["metadata"]["name"]
    waiting, foreign = [], []
    for meta in others:
        owners = meta.get("ownerReferences") or []
        earlier = [o for o in owners if o.get("kind") == "SpanningVM" and o.get("name") == vm_name]
        if earlier:
            waiting.append(
                f"{kind} {meta['name']} (of an earlier SpanningVM {vm_name},"
                f" uid {earlier[0].get('uid')})"
            )
        else:
            owner = ", ".join(f"{o.get('kind')} {o.get('name')}" for o in owners) or "none"
            foreign.append(f"{kind} {meta['name']} (owner: {owner})")
    if foreign:
        reason = Reason.NAME_CONFLICT
        message = (
            "cannot create the objects of this VM: their names are taken by "
            + "; ".join(foreign + waiting)
            + ". spanvm neither adopts nor deletes them: remove or rename them"
        )
    else:
        reason = Reason.WAITING_FOR_OLD_OBJECTS
        message = (
            "waiting for the garbage collector to delete "
            + "; ".join(waiting)
            + " before creating this VM's own"
        )
    event: list[Action] = []
    if _status(vm).get("message") != message:
        event = [PostEvent("Warning", reason, message)]
    return [
        *event,
        WriteStatus(
            {"phase": VMPhase.SCHEDULING, "message": message},  # placed; its objects wait
            (
                (ConditionType.FABRIC_READY, False, reason, message),
                (ConditionType.READY, False, reason, message),
            ),
        ),
    ]


def peers_and_labels(
    vm: JsonObject, placed: list[FragmentSummary], fragments: dict[int, JsonObject]
) -> list[Action]:
    """Every fragment lists every peer (endpoints as reported), carries the VM's labels and
    is asked to pause while the VM's spanvm.io/paused annotation says so."""
    peers = peers_of(placed, fragments)
    paused = (vm["metadata"].get("annotations") or {}).get(PAUSED_ANNOTATION) == "true"
    pause = DesiredState.PAUSED if paused else DesiredState.RUNNING
    out: list[Action] = []
    for index, frag in sorted(fragments.items()):
        patch: JsonObject = {}
        if frag["spec"].get("peers") != peers:
            patch["spec"] = {"peers": peers}
        want = fragment_labels(vm, index, frag["spec"]["nodeName"])
        have = frag["metadata"].get("labels") or {}
        if any(have.get(k) != v for k, v in want.items()):
            patch["metadata"] = {"labels": want}
        state = frag["spec"].get("desiredState") or DesiredState.RUNNING
        if state in (DesiredState.RUNNING, DesiredState.PAUSED) and state != pause:
            patch.setdefault("spec", {})["desiredState"] = pause
        if patch:
            out.append(PatchFragment(_name(frag), patch))
    return out


def report(
    vm: JsonObject, placed: list[FragmentSummary], fragments: dict[int, JsonObject], nodes: Nodes
) -> list[Action]:
    """The VM's status from its fragments (all of which exist)."""
    summaries = [
        entry.model_copy(update={"phase": fragment_phase(fragments.get(i))}).to_api()
        for i, entry in enumerate(placed)
    ]
    agg = aggregate(placed, fragments, nodes.health)
    out: list[Action] = []
    if agg.phase in FINISHED_VM_PHASES:
        out += ask_stop(fragments)  # the rest of a finished guest releases its room
    if _status(vm).get("phase") != agg.phase:
        failing = agg.phase in (VMPhase.FAILED, VMPhase.DEGRADED)
        out.append(PostEvent("Warning" if failing else "Normal", agg.phase, agg.message))
        if agg.phase == VMPhase.FAILED:
            out.append(CountFailure(Reason.FRAGMENT_FAILED))
    changes: JsonObject = {
        "phase": agg.phase,
        "message": agg.message,
        "fragments": summaries,
        "exitCode": agg.exit_code,
        "consoleTail": agg.console_tail,
        "consoleBytes": agg.console_bytes,
    }
    if agg.phase == VMPhase.SUCCEEDED:
        changes["startFailure"] = None  # a clean exit ends a run of failures
    ready = agg.phase == VMPhase.RUNNING and not agg.paused
    out.append(
        WriteStatus(
            changes,
            (
                (ConditionType.FABRIC_READY, agg.fabric_ready, agg.fabric_reason, agg.message),
                (ConditionType.READY, ready, agg.ready_reason, agg.message),
            ),
        )
    )
    return out


def fail(fragments: dict[int, JsonObject], why: str) -> list[Action]:
    """The guest cannot go on (runStrategy Once): Failed, with the cause; the rest stops."""
    return [
        *ask_stop(fragments),
        PostEvent("Warning", VMPhase.FAILED, why),
        CountFailure(Reason.FRAGMENT_DELETED),
        WriteStatus(
            {"phase": VMPhase.FAILED, "message": why},
            (
                (ConditionType.FABRIC_READY, False, Reason.FRAGMENT_DELETED, why),
                (ConditionType.READY, False, VMPhase.FAILED, why),
            ),
        ),
    ]


# What a new run starts from: no placement, no result of the previous run.
_NEW_RUN: JsonObject = {
    "fragments": None,
    "fragmentCount": None,
    "nodes": None,
    "exitCode": None,
    "consoleTail": None,
    "consoleBytes": None,
}


def restart(
    vm: JsonObject,
    fragments: dict[int, JsonObject],
    why: str,
    *,
    reason: Reason = Reason.RESTARTING,
    extra: JsonObject | None = None,
    counted: bool = True,
) -> list[Action]:
    """Delete the fragments and the placement; the next pass places the guest anew. Every
    condition says so: none keeps the previous run's words. `counted`: a restart (not a
    start of a stopped guest), in status.restarts and the metric."""
    restarts = int(_status(vm).get("restarts") or 0) + (1 if counted else 0)
    strategy = (vm.get("spec") or {}).get("runStrategy") or RunStrategy.ONCE
    message = (
        f"restarting the guest (runStrategy {strategy}, restart {restarts}): {why}"
        if counted
        else f"starting the guest (runStrategy {strategy}): {why}"
    )
    return [
        PostEvent("Warning" if reason == Reason.RESTARTING else "Normal", reason, message),
        *([CountRestart()] if counted else []),
        *delete_all(fragments),
        WriteStatus(
            {
                "phase": VMPhase.PENDING,
                "message": message,
                **_NEW_RUN,
                "restarts": restarts or None,
                **(extra or {}),
            },
            (
                (ConditionType.SCHEDULED, False, Reason.RESCHEDULING, message),
                (ConditionType.FABRIC_READY, False, reason, message),
                (ConditionType.READY, False, reason, message),
            ),
        ),
    ]


def rerun(vm: JsonObject, fragments: dict[int, JsonObject], request: Request) -> list[Action]:
    """A start or restart request: run the guest anew, failures forgotten."""
    again = request.verb == "restart"
    verb = "restart" if again else "start"
    return restart(
        vm,
        fragments,
        f"{verb} requested (spanvm {verb})",
        reason=Reason.RESTART_REQUESTED if again else Reason.START_REQUESTED,
        extra={"lastRequest": request.value, "startFailure": None},
        counted=again,
    )


def restart_after_end(
    vm: JsonObject, fragments: dict[int, JsonObject], why: str, *, failed: bool, nodes: Nodes
) -> list[Action]:
    """The guest ended and its runStrategy restarts it: at once after an exit 0 or a first
    failure, after CrashLoopBackOff's delay for a failure following failures."""
    if not failed:
        return restart(
            vm, fragments, why, reason=Reason.GUEST_RESTARTED, extra={"startFailure": None}
        )
    record = _status(vm).get("startFailure") or {}
    count = int(record.get("consecutiveFailCount") or 0)
    retry_at = parse_time(record.get("retryAfterTimestamp"))
    if retry_at is None:  # a new failure: count it
        count += 1
        delay = backoff(count, nodes.backoff_base)
        if delay > 0 and nodes.now is not None:
            return crash_loop(fragments, why, count, nodes.now + timedelta(seconds=delay), True)
    elif nodes.now is not None and nodes.now < retry_at:
        return crash_loop(fragments, why, count, retry_at, False)
    failures = {"consecutiveFailCount": count, "retryAfterTimestamp": None}
    return restart(vm, fragments, why, extra={"startFailure": failures})


def crash_loop(
    fragments: dict[int, JsonObject], why: str, count: int, retry_at: datetime, new: bool
) -> list[Action]:
    """Failed again: wait until `retry_at` before the next restart (KubeVirt's
    CrashLoopBackOff); what still runs is stopped meanwhile."""
    message = (
        f"failed {count} times in a row, restarting at {format_time(retry_at)}"
        f" (CrashLoopBackOff): {why}"
    )
    event: list[Action] = [PostEvent("Warning", Reason.CRASH_LOOP_BACK_OFF, message)] if new else []
    return [
        *ask_stop(fragments),
        *event,
        *([CountFailure(Reason.FRAGMENT_FAILED)] if new else []),
        WriteStatus(
            {
                "phase": VMPhase.FAILED,
                "message": message,
                "startFailure": {
                    "consecutiveFailCount": count,
                    "retryAfterTimestamp": format_time(retry_at),
                },
            },
            (
                (ConditionType.FABRIC_READY, False, Reason.FRAGMENT_FAILED, message),
                (ConditionType.READY, False, Reason.CRASH_LOOP_BACK_OFF, message),
            ),
        ),
    ]


def halt(fragments: dict[int, JsonObject], why: str, request: Request | None) -> list[Action]:
    """Not to run (Halted, a stop request, Manual before its first start): stop every
    fragment, then remove them; once none runs, nothing in status speaks of a run."""
    reason = (
        Reason.HALTED
        if why.startswith("runStrategy is Halted")
        else Reason.WAITING_FOR_START
        if why.startswith("runStrategy is Manual")
        else Reason.STOPPED_BY_REQUEST
    )
    running = [f for _, f in sorted(fragments.items()) if not terminal(f)]
    changes: JsonObject = {"lastRequest": request.value} if request is not None else {}
    if running:
        message = f"{why}: stopping fragments " + ", ".join(_name(f) for f in running)
        changes["message"] = message
        removal: list[Action] = []
    else:
        message = f"{why}: the guest is not running"
        changes.update(
            {
                "phase": VMPhase.STOPPED,
                "message": message,
                "fragments": None,
                "fragmentCount": None,
                "nodes": None,
                "startFailure": None,
            }
        )
        removal = delete_all(fragments)
    return [
        *ask_stop(fragments),
        *removal,
        WriteStatus(
            changes,
            (
                (ConditionType.SCHEDULED, False, reason, message),
                (ConditionType.FABRIC_READY, False, reason, message),
                (ConditionType.READY, False, reason, message),
            ),
        ),
    ]


# -- deletion --------------------------------------------------------------------------------
def decide_deletion(
    vm: JsonObject, fragments: dict[int, JsonObject], now: datetime, grace: float
) -> list[Action]:
    """Stop the fragments; delete them once stopped, or anyway once `grace` seconds have
    passed since deletionTimestamp; until then WaitForStop."""
    stop = ask_stop(fragments)
    waiting = [f for _, f in sorted(fragments.items()) if not terminal(f)]
    if not waiting:
        return [*stop, *delete_all(fragments)]
    deleted_at = parse_time(vm["metadata"].get("deletionTimestamp"))
    waited = (now - deleted_at).total_seconds() if deleted_at else 0.0
    names = ", ".join(f"{_name(f)} on {f['spec']['nodeName']}" for f in waiting)
    if waited >= grace:
        message = f"fragments {names} did not report stopped within {grace:.0f}s; deleted anyway"
        return [
            *stop,
            WriteStatus(
                {"phase": VMPhase.TERMINATING, "message": message},
                ((ConditionType.READY, False, Reason.FORCED_DELETION, message),),
            ),
            PostEvent("Warning", Reason.FORCED_DELETION, message),
            *delete_all(fragments),
        ]
    message = f"waiting for fragments {names} to stop (forced in {grace - waited:.0f}s)"
    return [
        *stop,
        WriteStatus(
            {"phase": VMPhase.TERMINATING, "message": message},
            ((ConditionType.READY, False, Reason.TERMINATING, message),),
        ),
        WaitForStop(message),
    ]
