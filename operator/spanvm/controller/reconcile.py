"""Level-triggered reconciliation of one SpanningVM, and its deletion.

Everything is read back from the API on each pass: the VM, its fragments, nodes, heartbeat
Leases. The placement is written to status before any fragment exists and fragments have
deterministic names, so a pass interrupted anywhere (operator killed, two replicas racing)
is finished by the next one without duplicates. Blocking API calls run in threads.
"""

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from spanvm.api.spanningvm import FragmentSummary, SpanningVMSpec
from spanvm.controller import metrics
from spanvm.controller.cluster_view import (
    FINISHED_VM_PHASES,
    STARTED_VM_PHASES,
    TERMINAL_FRAGMENT_PHASES,
    HeartbeatObserver,
    NodeHealth,
    node_health,
    node_infos,
    usage_by_node,
)
from spanvm.controller.fragments import (
    fabric_secret,
    fabric_vouches,
    fragment_body,
    fragment_labels,
    owned_by,
    peers_of,
    recorded_placement,
    request_of,
)
from spanvm.controller.status import FABRIC_READY, READY, SCHEDULED, aggregate, set_condition
from spanvm.kube import JsonObject, Kube, api_error_text
from spanvm.rfc3339 import parse_time
from spanvm.scheduler.placement import Unschedulable, schedule
from spanvm.scheduler.snapshot import NodeInfo

log = logging.getLogger("spanvm.operator")
T = TypeVar("T")
FAULT_EXIT_ENV = "SPANVM_FAULT_EXIT_AFTER_CREATES"  # fault injection for restart tests


class EventSink(Protocol):
    """Posts a Kubernetes Event about an object (Kopf's poster in the operator)."""

    def __call__(self, obj: JsonObject, type_: str, reason: str, message: str) -> None: ...


class WaitForStop(Exception):  # noqa: N818 - a state, not an error
    """Deletion must wait: fragments are still stopping."""


@dataclass
class OperatorConfig:
    """How the operator runs."""

    system_namespace: str
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace
    timer_interval: float = 5.0
    deletion_grace: float = 60.0
    node_loss_grace: float = 40.0  # a node must stay lost this long before a restart


def _vm_ref(vm: JsonObject) -> str:
    return f"{vm['metadata']['namespace']}/{vm['metadata']['name']}"


class Reconciler:
    """Reconciles SpanningVMs; one instance per operator process."""

    def __init__(self, kube: Kube, config: OperatorConfig, events: EventSink) -> None:
        self.kube, self.config, self.events = kube, config, events
        self.schedule_lock = asyncio.Lock()  # one placement decision at a time
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._creates = 0
        self._fault_exit_after = int(os.environ.get(FAULT_EXIT_ENV, "0") or 0)
        self.heartbeats = HeartbeatObserver()
        self._lost_since: dict[str, float] = {}  # node -> when (monotonic) first seen lost

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    # -- reading -----------------------------------------------------------------------------
    async def _fragments(self, vm: JsonObject) -> dict[int, JsonObject]:
        """The VM's own fragments, found by owner uid alone: no label or name is trusted (a
        namesake's leftovers, or an object someone else made, are not ours)."""
        meta = vm["metadata"]
        items = await self._call(self.kube.list_fragments, meta["namespace"], None)
        return {int(f["spec"]["index"]): f for f in items if owned_by(f, meta["uid"])}

    async def _nodes(self) -> list[NodeInfo]:
        """Every node with its readiness and agent heartbeat, read once per pass."""
        nodes = await self._call(self.kube.list_nodes)
        leases = await self._call(self.kube.list_leases, self.config.system_namespace)
        infos = node_infos(nodes, self.heartbeats.observe(leases))
        now = time.monotonic()
        for name, health in node_health(infos).items():
            if health.healthy:
                self._lost_since.pop(name, None)
            else:
                self._lost_since.setdefault(name, now)
        return infos

    def _lost_for(self, node: str, health: dict[str, NodeHealth]) -> float:
        """Seconds this node has been seen lost (a node that no longer exists: forever)."""
        if node not in health:
            return float("inf")
        return time.monotonic() - self._lost_since.get(node, time.monotonic())

    # -- the pass ----------------------------------------------------------------------------
    async def reconcile(self, namespace: str, name: str) -> None:
        """Bring one VM a step closer to its spec; safe to call any time, any number of times."""
        started = time.perf_counter()
        result = "error"
        try:
            async with self._lock(namespace, name):
                try:
                    await self._reconcile(namespace, name)
                except ApiException as err:
                    await self._report_api_error(namespace, name, err)
                    raise
            result = "ok"
        finally:
            metrics.RECONCILES.labels(result).inc()
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)

    async def _report_api_error(self, namespace: str, name: str, err: ApiException) -> None:
        """An API call of this pass was refused: say so in status and an Event (the pass is
        retried), so a VM never sits without a phase or a reason."""
        message = f"the API server refused a request ({api_error_text(err)}); retrying"
        log.warning("[%s/%s] %s", namespace, name, message)
        try:
            vm = await self._call(self.kube.get_vm, namespace, name)
            if vm is None or vm["metadata"].get("deletionTimestamp"):
                return
            status = vm.get("status") or {}
            if status.get("message") != message:
                self.events(vm, "Warning", "ReconcileError", message)
            await self._write(
                vm,
                {"phase": status.get("phase") or "Pending", "message": message},
                conditions=[(READY, False, "ReconcileError", message)],
            )
        except ApiException as again:
            log.warning("[%s/%s] cannot report it either: %s", namespace, name, again.reason)

    def deletion_overdue(self, vm: JsonObject) -> float | None:
        """Seconds since deletion was asked for, if past --deletion-grace; else None."""
        deleted_at = parse_time(vm["metadata"].get("deletionTimestamp"))
        waited = (datetime.now(UTC) - deleted_at).total_seconds() if deleted_at else 0.0
        return waited if waited >= self.config.deletion_grace else None

    async def _reconcile(self, namespace: str, name: str) -> None:
        vm = await self._call(self.kube.get_vm, namespace, name)
        if vm is None or vm["metadata"].get("deletionTimestamp"):
            return  # gone, or the delete handler owns it now
        status: JsonObject = vm.get("status") or {}
        try:
            spec = SpanningVMSpec.model_validate(vm["spec"])
        except ValidationError as err:
            await self._write(vm, {"phase": "Failed", "message": f"invalid spec: {err}"})
            return
        fragments = await self._fragments(vm)
        placed = [FragmentSummary.model_validate(e) for e in status.get("fragments") or []]
        if spec.run_strategy == "Halted":
            await self._halt(vm, fragments)
            return
        if spec.run_strategy == "Once" and status.get("phase") in FINISHED_VM_PHASES:
            # Final: what still runs is stopped, nothing is re-created or relaunched, the
            # status (phase, first cause, exit code) stays as it was when the guest ended.
            await self._ask_stop(fragments)
            return
        nodes = await self._nodes()
        health = node_health(nodes)
        if placed and len(fragments) == len(placed):
            agg = aggregate(placed, fragments, health)
            grace = self.config.node_loss_grace
            # A node briefly NotReady (or an agent briefly silent) is no reason to kill the
            # guest: its fragments keep running, and if the node is really gone the fabric
            # fails the VM soon (peers lose it), which restarts it at once. Fragments on
            # healthy nodes still Running are that evidence: their fabric still reaches the
            # suspect node's fragments, so the guest is left alone however long it lasts.
            lost = [n for n in agg.lost_nodes if self._lost_for(n, health) >= grace]
            if lost and fabric_vouches(placed, fragments, health):
                lost = []
            if spec.run_strategy == "Always" and (agg.failed or lost):
                await self._restart(vm, fragments, agg.message)
                return
        missing = [p.name for i, p in enumerate(placed) if i not in fragments]
        if missing and status.get("phase") in STARTED_VM_PHASES | FINISHED_VM_PHASES:
            # A fragment deleted under a started guest took part of it along: re-creating it
            # would relaunch a fragment into a guest that has lost its state. Once: the guest
            # failed; Always: restart it whole.
            why = f"fragment(s) {', '.join(missing)} deleted after the guest started"
            if spec.run_strategy == "Always":
                await self._restart(vm, fragments, why)
            else:
                await self._fail(vm, fragments, why)
            return
        if not placed:
            if fragments:  # the previous run's fragments must go before a new placement
                await self._delete_fragments(vm, fragments)
                await self._write(vm, {"phase": "Pending", "message": "removing old fragments"})
                return
            placed_or_none = await self._place(vm, spec, nodes)
            if placed_or_none is None:
                return
            placed = placed_or_none
        made = await self._materialise(vm, spec, placed, fragments)
        if made is None:
            return  # a name is taken by an object that is not ours: reported, nothing else
        if made:
            fragments = await self._fragments(vm)
        await self._update_peers_and_labels(vm, placed, fragments)
        await self._report(vm, placed, fragments, health)

    async def _place(
        self, vm: JsonObject, spec: SpanningVMSpec, nodes: list[NodeInfo]
    ) -> list[FragmentSummary] | None:
        """Schedule under the global lock and record the placement; None if it cannot. What
        fragments use is read inside the lock, so two VMs never take the same room."""
        meta = vm["metadata"]
        async with self.schedule_lock:
            all_fragments = await self._call(self.kube.list_fragments, None, None)
            all_vms = await self._call(self.kube.list_vms, None)
            decision = schedule(
                nodes,
                usage_by_node(all_fragments, all_vms, (meta["namespace"], meta["name"])),
                request_of(spec),
            )
            if isinstance(decision, Unschedulable):
                metrics.UNSCHEDULABLE.inc()
                await self._unschedulable(vm, decision.message)
                return None
            placed = recorded_placement(meta["name"], decision)
            nodes_text = ", ".join(f"{p.node_name} (vCPUs {p.vcpu_ids})" for p in placed)
            await self._write(
                vm,
                {
                    "phase": "Scheduling",
                    "fragments": [p.to_api() for p in placed],
                    "fragmentCount": len(placed),
                    "nodes": ",".join(p.node_name for p in placed),
                    "message": f"placed on {nodes_text}",
                },
                conditions=[(SCHEDULED, True, "Placed", f"placed on {nodes_text}")],
            )
        metrics.PLACEMENTS.inc()
        self.events(vm, "Normal", "Scheduled", f"placed on {nodes_text}")
        log.info("[%s] placed on %s", _vm_ref(vm), nodes_text)
        return placed

    async def _unschedulable(self, vm: JsonObject, message: str) -> None:
        status = vm.get("status") or {}
        if status.get("message") != message:
            self.events(vm, "Warning", "Unschedulable", message)
            log.info("[%s] unschedulable: %s", _vm_ref(vm), message)
        await self._write(
            vm,
            {"phase": "Pending", "message": message},
            conditions=[
                (SCHEDULED, False, "Unschedulable", message),
                (READY, False, "Pending", message),
            ],
        )

    async def _materialise(
        self,
        vm: JsonObject,
        spec: SpanningVMSpec,
        placed: list[FragmentSummary],
        fragments: dict[int, JsonObject],
    ) -> bool | None:
        """The Secret and every missing VMFragment of the recorded placement; True if this
        pass created any fragment, None if a name is taken by an object this VM does not own
        (then nothing is adopted, deleted or started; the clash is reported)."""
        ns, uid = vm["metadata"]["namespace"], vm["metadata"]["uid"]
        if len(fragments) == len(placed):
            return False
        # Named after the VM's uid: a 409 here is this VM's own Secret from an earlier pass.
        await self._call(self.kube.create_secret, ns, fabric_secret(vm))
        taken: list[JsonObject] = []
        for index in range(len(placed)):
            if index in fragments:
                continue
            created = await self._call(
                self.kube.create_fragment, ns, fragment_body(vm, spec, placed, index)
            )
            if not created:  # ours would be in `fragments`: this one belongs to someone else
                other = await self._call(self.kube.get_fragment, ns, placed[index].name)
                if other is not None and not owned_by(other, uid):
                    taken.append(other["metadata"])
            if created:
                metrics.FRAGMENTS_CREATED.inc()
                self._creates += 1
                log.info("[%s] created fragment %s", _vm_ref(vm), placed[index].name)
                if self._fault_exit_after and self._creates >= self._fault_exit_after:
                    log.error("fault injection: exiting after %d fragment creates", self._creates)
                    os._exit(3)
        if taken:
            await self._name_taken(vm, "VMFragment", *taken)
            return None
        return True

    async def _name_taken(self, vm: JsonObject, kind: str, *others: JsonObject) -> None:
        """Names this VM needs are held by objects it does not own: say whose, and wait. An
        object of an earlier SpanningVM of the same name is garbage-collected in time; any
        other must be removed or renamed by whoever made it."""
        vm_meta = vm["metadata"]
        waiting, foreign = [], []
        for meta in others:
            owners = meta.get("ownerReferences") or []
            earlier = [
                o
                for o in owners
                if o.get("kind") == "SpanningVM" and o.get("name") == vm_meta["name"]
            ]
            if earlier:
                waiting.append(
                    f"{kind} {meta['name']} (of an earlier SpanningVM {vm_meta['name']},"
                    f" uid {earlier[0].get('uid')})"
                )
            else:
                owner = ", ".join(f"{o.get('kind')} {o.get('name')}" for o in owners) or "none"
                foreign.append(f"{kind} {meta['name']} (owner: {owner})")
        if foreign:
            reason = "NameConflict"
            message = (
                "cannot create the objects of this VM: their names are taken by "
                + "; ".join(foreign + waiting)
                + ". spanvm neither adopts nor deletes them: remove or rename them"
            )
        else:
            reason = "WaitingForOldObjects"
            message = (
                "waiting for the garbage collector to delete "
                + "; ".join(waiting)
                + " before creating this VM's own"
            )
        if (vm.get("status") or {}).get("message") != message:
            self.events(vm, "Warning", reason, message)
            log.warning("[%s] %s", _vm_ref(vm), message)
        await self._write(
            vm,
            {"phase": "Scheduling", "message": message},  # placed; its objects wait
            conditions=[(FABRIC_READY, False, reason, message), (READY, False, reason, message)],
        )

    async def _update_peers_and_labels(
        self, vm: JsonObject, placed: list[FragmentSummary], fragments: dict[int, JsonObject]
    ) -> None:
        if len(fragments) < len(placed):
            return
        peers = peers_of(placed, fragments)
        for index, frag in fragments.items():
            patch: JsonObject = {}
            if frag["spec"].get("peers") != peers:
                patch["spec"] = {"peers": peers}
            want = fragment_labels(vm, index, frag["spec"]["nodeName"])
            have = frag["metadata"].get("labels") or {}
            if any(have.get(k) != v for k, v in want.items()):
                patch["metadata"] = {"labels": want}
            if patch:
                await self._call(
                    self.kube.patch_fragment,
                    frag["metadata"]["namespace"],
                    frag["metadata"]["name"],
                    patch,
                )

    async def _report(
        self,
        vm: JsonObject,
        placed: list[FragmentSummary],
        fragments: dict[int, JsonObject],
        health: dict[str, NodeHealth],
    ) -> None:
        summaries = []
        for i, entry in enumerate(placed):
            phase = ((fragments.get(i) or {}).get("status") or {}).get("phase") or "Pending"
            summaries.append(entry.model_copy(update={"phase": phase}).to_api())
        if len(fragments) < len(placed):
            await self._write(vm, {"phase": "Scheduling", "fragments": summaries})
            return
        agg = aggregate(placed, fragments, health)
        previous = (vm.get("status") or {}).get("phase")
        if agg.phase in FINISHED_VM_PHASES:
            await self._ask_stop(fragments)  # the rest of a finished guest releases its room
        if previous != agg.phase:
            kind = "Warning" if agg.phase in ("Failed", "Degraded") else "Normal"
            self.events(vm, kind, agg.phase, agg.message)
            log.info("[%s] %s: %s", _vm_ref(vm), agg.phase, agg.message)
            if agg.phase == "Failed":
                metrics.FAILURES.labels("FragmentFailed").inc()
        status: JsonObject = {
            "phase": agg.phase,
            "message": agg.message,
            "fragments": summaries,
            "exitCode": agg.exit_code,
            "consoleTail": agg.console_tail,
        }
        await self._write(
            vm,
            status,
            conditions=[
                (FABRIC_READY, agg.fabric_ready, agg.fabric_reason, agg.message),
                (READY, agg.phase == "Running", agg.phase, agg.message),
            ],
        )

    async def _fail(self, vm: JsonObject, fragments: dict[int, JsonObject], why: str) -> None:
        """The guest cannot go on (runStrategy Once): Failed, with the cause; the rest stops."""
        await self._ask_stop(fragments)
        self.events(vm, "Warning", "Failed", why)
        log.warning("[%s] failed: %s", _vm_ref(vm), why)
        metrics.FAILURES.labels("FragmentDeleted").inc()
        await self._write(
            vm,
            {"phase": "Failed", "message": why},
            conditions=[
                (FABRIC_READY, False, "FragmentDeleted", why),
                (READY, False, "Failed", why),
            ],
        )

    async def _restart(self, vm: JsonObject, fragments: dict[int, JsonObject], why: str) -> None:
        restarts = int((vm.get("status") or {}).get("restarts") or 0) + 1
        message = f"restarting the guest (runStrategy Always, restart {restarts}): {why}"
        self.events(vm, "Warning", "Restarting", message)
        log.warning("[%s] %s", _vm_ref(vm), message)
        metrics.RESTARTS.inc()
        await self._delete_fragments(vm, fragments)
        await self._write(
            vm,
            {
                "phase": "Pending",
                "message": message,
                "fragments": None,
                "fragmentCount": None,
                "nodes": None,
                "restarts": restarts,
            },
            conditions=[
                (SCHEDULED, False, "Rescheduling", message),
                (READY, False, "Restarting", message),
            ],
        )

    async def _halt(self, vm: JsonObject, fragments: dict[int, JsonObject]) -> None:
        """runStrategy Halted: stop every fragment, then remove them."""
        await self._ask_stop(fragments)
        running = [f for f in fragments.values() if not _terminal(f)]
        if running:
            message = "stopping fragments " + ", ".join(f["metadata"]["name"] for f in running)
        else:
            await self._delete_fragments(vm, fragments)
            message = "runStrategy is Halted: the guest is not running"
        await self._write(
            vm,
            {"phase": "Stopped", "message": message, "fragments": None, "nodes": None}
            if not running
            else {"message": message},
            conditions=[(READY, False, "Halted", message)],
        )

    # -- deletion ----------------------------------------------------------------------------
    async def finalize(self, namespace: str, name: str) -> None:
        """Stop the fragments; WaitForStop until they report stopped or the grace runs out."""
        async with self._lock(namespace, name):
            vm = await self._call(self.kube.get_vm, namespace, name)
            if vm is None:
                return
            fragments = await self._fragments(vm)
            await self._ask_stop(fragments)
            waiting = [f for f in fragments.values() if not _terminal(f)]
            if not waiting:
                await self._delete_fragments(vm, fragments)
                log.info("[%s] every fragment stopped; deleting", _vm_ref(vm))
                return
            deleted_at = parse_time(vm["metadata"].get("deletionTimestamp"))
            waited = (datetime.now(UTC) - deleted_at).total_seconds() if deleted_at else 0.0
            names = ", ".join(
                f"{f['metadata']['name']} on {f['spec']['nodeName']}" for f in waiting
            )
            if waited >= self.config.deletion_grace:
                message = (
                    f"fragments {names} did not report stopped within"
                    f" {self.config.deletion_grace:.0f}s; deleted anyway"
                )
                await self._write(
                    vm,
                    {"phase": "Terminating", "message": message},
                    conditions=[(READY, False, "ForcedDeletion", message)],
                )
                self.events(vm, "Warning", "ForcedDeletion", message)
                log.warning("[%s] %s", _vm_ref(vm), message)
                await self._delete_fragments(vm, fragments)
                return
            left = self.config.deletion_grace - waited
            message = f"waiting for fragments {names} to stop (forced in {left:.0f}s)"
            await self._write(
                vm,
                {"phase": "Terminating", "message": message},
                conditions=[(READY, False, "Terminating", message)],
            )
            raise WaitForStop(message)

    async def _ask_stop(self, fragments: dict[int, JsonObject]) -> None:
        for frag in fragments.values():
            if not _terminal(frag) and frag["spec"].get("desiredState") != "Stopped":
                meta = frag["metadata"]
                await self._call(
                    self.kube.patch_fragment,
                    meta["namespace"],
                    meta["name"],
                    {"spec": {"desiredState": "Stopped"}},
                )

    async def _delete_fragments(self, vm: JsonObject, fragments: dict[int, JsonObject]) -> None:
        for frag in fragments.values():
            await self._call(
                self.kube.delete_fragment, vm["metadata"]["namespace"], frag["metadata"]["name"]
            )

    # -- writing -----------------------------------------------------------------------------
    async def _write(
        self,
        vm: JsonObject,
        changes: JsonObject,
        conditions: Sequence[tuple[str, bool, str, str]] = (),
    ) -> None:
        """Merge-patch status (only if something changes), with observedGeneration."""
        status: JsonObject = vm.get("status") or {}
        generation = int(vm["metadata"].get("generation") or 0)
        now = datetime.now(UTC)
        conds = list(status.get("conditions") or [])
        for type_, ok, reason, message in conditions:
            conds = set_condition(conds, type_, ok, reason, message, generation, now)
        patch = {**changes, "observedGeneration": generation}
        if conditions:
            patch["conditions"] = conds
        if all(status.get(k) == v for k, v in patch.items()):
            return
        meta = vm["metadata"]
        await self._call(self.kube.patch_vm_status, meta["namespace"], meta["name"], patch)
        vm["status"] = {**status, **{k: v for k, v in patch.items() if v is not None}}


def _terminal(fragment: JsonObject) -> bool:
    return (fragment.get("status") or {}).get("phase") in TERMINAL_FRAGMENT_PHASES
