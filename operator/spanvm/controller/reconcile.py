"""Carries out the lifecycle's actions (`lifecycle.py`) for one SpanningVM, and its deletion.

Reads come from the watch caches (`cache.py`); every object this process writes goes back
into them at once. The placement is written to status before any fragment exists and
fragments have deterministic names, so a pass interrupted anywhere (operator killed, two
replicas racing) is finished by the next one without duplicates. Blocking API calls run in
threads. Fault injection is a hook (`Hooks`) passed in by tests, never set in the product.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from kubernetes.client.exceptions import ApiException

from spanvm.api.constants import FINALIZER
from spanvm.api.phases import ConditionType, Reason, VMPhase
from spanvm.api.spanningvm import FragmentSummary, SpanningVMSpec
from spanvm.controller import lifecycle, metrics
from spanvm.controller.cache import ClusterCache
from spanvm.controller.cluster_view import (
    HeartbeatObserver,
    NodeHealth,
    NodeInfoMemo,
    node_health,
    owned_by,
)
from spanvm.controller.fragments import (
    fabric_secret,
    fragment_bodies,
    hold_back_peers,
    recorded_placement,
    request_of,
)
from spanvm.controller.lifecycle import Action
from spanvm.controller.priority import PlacementFirst
from spanvm.controller.run_strategy import BACKOFF_BASE
from spanvm.controller.status_write import (
    FIELDS,
    ConditionSpec,
    merge_patch,
    next_status,
    own_status,
)
from spanvm.controller.usage import UsageMemo
from spanvm.kube import CONFLICT, INVALID, JsonObject, Kube, api_error_text
from spanvm.rfc3339 import parse_time
from spanvm.scheduler.placement import ClusterIndex, Unschedulable

log = logging.getLogger("spanvm.operator")
T = TypeVar("T")
NODES_REFRESH = 1.0  # seconds the derived node view is reused though Leases renewed since
GUARD_ATTEMPTS = 5  # finalizer writes tried against a VM that keeps changing


class EventSink(Protocol):
    """Posts a Kubernetes Event about an object (Kopf's poster in the operator)."""

    def __call__(self, obj: JsonObject, type_: str, reason: str, message: str) -> None: ...


class WaitForStop(Exception):  # noqa: N818 - a state, not an error
    """Deletion must wait: fragments are still stopping."""


@dataclass
class Hooks:
    """Where tests inject faults: called after every fragment this process creates, with the
    number created so far (a test exits the process there to kill it mid-placement)."""

    after_fragment_create: Callable[[int], None] = lambda _count: None


@dataclass
class OperatorConfig:
    """How the operator runs."""

    system_namespace: str
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace
    timer_interval: float = 5.0
    deletion_grace: float = 60.0
    node_loss_grace: float = 40.0  # a node must stay lost this long before a restart
    restart_backoff: float = BACKOFF_BASE  # CrashLoopBackOff before the 2nd restart in a row


def _key(obj: JsonObject) -> tuple[str, str]:
    return (obj["metadata"]["namespace"], obj["metadata"]["name"])


def _same(a: Sequence[object], b: Sequence[object]) -> bool:
    """The same objects, in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _unchanged(decided: JsonObject, now: JsonObject | None) -> bool:
    """Whether the VM a pass decided on (its metadata then: `decided`) is still the same
    (its metadata now: `now`): not deleted, replaced by another of its name, being deleted,
    or given a new spec since."""
    if now is None or now.get("deletionTimestamp"):
        return False
    return all(now.get(k) == decided.get(k) for k in ("uid", "generation"))


def _vm_ref(vm: JsonObject) -> str:
    return f"{vm['metadata']['namespace']}/{vm['metadata']['name']}"


class Reconciler:
    """Reconciles SpanningVMs; one instance per operator process."""

    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        events: EventSink,
        cache: ClusterCache,
        hooks: Hooks | None = None,
    ) -> None:
        self.kube, self.config, self.events, self.cache = kube, config, events, cache
        self.hooks = hooks or Hooks()
        self.schedule_lock = asyncio.Lock()  # one placement decision at a time
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._creates = 0
        self.heartbeats = HeartbeatObserver()
        self._lost_since: dict[str, float] = {}  # node -> when (monotonic) first seen lost
        self._nodes_memo: tuple[tuple[int, int], float, dict[str, NodeHealth], ClusterIndex] | None
        self._nodes_memo = None
        self._owners: tuple[int, dict[str, dict[int, JsonObject]]] = (-1, {})
        self._assumed: dict[tuple[str, str], JsonObject] = {}  # placements being written
        self._usage = UsageMemo()
        self._node_infos = NodeInfoMemo()
        self.placement_first = PlacementFirst()
        # placement Events not posted yet: the VM as placed, and its Events
        self._held_events: dict[tuple[str, str], tuple[JsonObject, list[lifecycle.PostEvent]]] = {}

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def busy(self, namespace: str, name: str) -> bool:
        """Whether a pass (or the deletion) of this VM is running now."""
        lock = self._locks.get((namespace, name))
        return lock is not None and lock.locked()

    # -- reading (from the caches) -----------------------------------------------------------
    def _fragments(self, vm: JsonObject) -> dict[int, JsonObject]:
        """The VM's own fragments, found by owner uid alone: no label or name is trusted (a
        namesake's leftovers, or an object someone else made, are not ours)."""
        changes = self.cache.fragments.changes
        if self._owners[0] != changes:
            owners: dict[str, dict[int, JsonObject]] = {}
            for frag in self.cache.fragments.items():
                for ref in frag["metadata"].get("ownerReferences") or []:
                    if ref.get("uid"):
                        owners.setdefault(ref["uid"], {})[int(frag["spec"]["index"])] = frag
            self._owners = (changes, owners)
        meta = vm["metadata"]
        return {
            i: f
            for i, f in self._owners[1].get(meta["uid"], {}).items()
            if f["metadata"].get("namespace") == meta["namespace"]
        }

    def _nodes(self) -> tuple[lifecycle.Nodes, ClusterIndex]:
        """The nodes as the lifecycle sees them (health, how long each has been lost) and the
        scheduler's index of them; derived again once a Node or Lease changed, at most every
        NODES_REFRESH s (a thousand agents renew a Lease every few milliseconds between
        them)."""
        now = time.monotonic()
        version = (self.cache.nodes.changes, self.cache.leases.changes)
        memo = self._nodes_memo
        if memo is None or (memo[0] != version and now - memo[1] >= NODES_REFRESH):
            fresh = self.heartbeats.observe(self.cache.leases.items())
            infos = self._node_infos.infos(self.cache.nodes.items(), fresh)
            if memo is not None and _same(infos, memo[3].nodes):
                memo = self._nodes_memo = (version, now, memo[2], memo[3])  # Leases renewed
            else:
                health = node_health(infos)
                for name, node in health.items():
                    if node.healthy:
                        self._lost_since.pop(name, None)
                    else:
                        self._lost_since.setdefault(name, now)
                memo = self._nodes_memo = (version, now, health, ClusterIndex(infos))
        nodes = lifecycle.Nodes(
            health=memo[2],
            lost_for={n: now - t for n, t in self._lost_since.items()},
            loss_grace=self.config.node_loss_grace,
            now=datetime.now(UTC),
            backoff_base=self.config.restart_backoff,
        )
        return nodes, memo[3]

    def gone(self, vm: JsonObject) -> None:
        """A SpanningVM was deleted: it waits for nothing any more, its held Events go."""
        self.placement_first.done(_key(vm))
        self._held_events.pop(_key(vm), None)

    def seen(self, obj: JsonObject) -> None:
        """An object Kopf handed a handler: the caches never hold an older one."""
        kind = obj.get("kind")
        if kind == "SpanningVM":
            self.cache.vms.assume(obj)
            newest = self.cache.vms.get(*_key(obj))  # a pass may have written it since
            if newest is not None and newest["metadata"].get("uid") == obj["metadata"]["uid"]:
                obj = newest
            meta = obj["metadata"]
            if obj.get("status") or meta.get("deletionTimestamp"):
                self.placement_first.done(_key(obj))  # placed (or why not) is written
            elif FINALIZER not in (meta.get("finalizers") or []):
                self.placement_first.wait_for_placement(_key(obj))  # new: its pass places it
        elif kind == "VMFragment":
            self.cache.fragments.assume(obj)

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
            self.placement_first.done((namespace, name))
            self._post_held_events((namespace, name))
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
                self.events(vm, "Warning", Reason.RECONCILE_ERROR, message)
            await self._write(
                vm,
                {"phase": status.get("phase") or VMPhase.PENDING, "message": message},
                conditions=[(ConditionType.READY, False, Reason.RECONCILE_ERROR, message)],
            )
        except ApiException as again:
            log.warning("[%s/%s] cannot report it either: %s", namespace, name, again.reason)

    def deletion_overdue(self, vm: JsonObject) -> float | None:
        """Seconds since deletion was asked for, if past --deletion-grace; else None."""
        deleted_at = parse_time(vm["metadata"].get("deletionTimestamp"))
        waited = (datetime.now(UTC) - deleted_at).total_seconds() if deleted_at else 0.0
        return waited if waited >= self.config.deletion_grace else None

    async def _reconcile(self, namespace: str, name: str) -> None:
        vm = self.cache.vms.get(namespace, name)
        if vm is None or vm["metadata"].get("deletionTimestamp"):
            return  # gone, or the delete handler owns it now
        nodes, index = self._nodes()
        if self._fragments(vm) and not await self._guard(vm):
            return  # gone, being deleted or re-specified (a finalizer taken off by hand is back)
        for _round in range(2):  # once more after creating fragments
            actions = lifecycle.decide(vm, self._fragments(vm), nodes)
            again = await self._carry_out(vm, actions, index)
            if not again:
                return

    async def _carry_out(
        self, vm: JsonObject, actions: Sequence[Action], index: ClusterIndex
    ) -> bool:
        """Do what the lifecycle asked, in order; True if it should decide again now."""
        again = False
        for action in actions:
            match action:
                case lifecycle.WriteStatus(changes, conditions):
                    await self._write(vm, changes, conditions)
                case lifecycle.PostEvent():
                    self._post(vm, action)
                case lifecycle.AskStop(names):
                    for frag in names:
                        await self._patch_fragment(vm, frag, {"spec": {"desiredState": "Stopped"}})
                case lifecycle.DeleteFragments(names):
                    await self._delete_fragments(vm, names)
                case lifecycle.PatchFragment(frag, patch):
                    await self._patch_fragment(vm, frag, patch)
                case lifecycle.Place():
                    again = await self._place(vm, index)
                case lifecycle.Materialise(placed):
                    held = await self.placement_first.turn()
                    if held >= 0.01:
                        log.debug("[%s] held back %.2fs for placements", _vm_ref(vm), held)
                        now = self.cache.vms.get(*_key(vm))
                        if not _unchanged(vm["metadata"], now and now["metadata"]):
                            return False  # deleted or changed meanwhile: the next pass decides
                    self._post_held_events(_key(vm))
                    if not await self._guard(vm):
                        return False
                    again = await self._materialise(vm, list(placed))
                case lifecycle.CountFailure(reason):
                    metrics.FAILURES.labels(reason).inc()
                case lifecycle.CountRestart():
                    metrics.RESTARTS.inc()
                case lifecycle.WaitForStop(message):
                    raise WaitForStop(message)
        return again

    def _post(self, vm: JsonObject, event: lifecycle.PostEvent) -> None:
        self.events(vm, event.type, event.reason, event.message)
        log.info("[%s] %s: %s", _vm_ref(vm), event.reason, event.message)

    def _post_held_events(self, key: tuple[str, str]) -> None:
        held = self._held_events.pop(key, None)
        if held is not None:
            for event in held[1]:
                self._post(held[0], event)

    async def _place(self, vm: JsonObject, index: ClusterIndex) -> bool:
        """Schedule under the global lock and record the placement; False if it cannot.

        What fragments use is read inside the lock, and a placement is held in memory from
        the moment it is decided until its status write is back (as kube-scheduler assumes a
        pod before binding it): the next decision counts it while this one is being written,
        so two VMs never take the same room and decisions do not wait on API round trips."""
        meta = vm["metadata"]
        key = (meta["namespace"], meta["name"])
        spec = SpanningVMSpec.model_validate(vm["spec"])
        async with self.schedule_lock:
            vms = [self._assumed.get(_key(v), v) for v in self.cache.vms.items()]
            usage = self._usage.usage(self.cache.fragments.items(), vms, key)
            decision = index.schedule(usage, request_of(spec))
            if not isinstance(decision, Unschedulable):
                placed = recorded_placement(meta["name"], decision)
                actions = lifecycle.placed_status(placed)
                recorded = next(a for a in actions if isinstance(a, lifecycle.WriteStatus))
                status = {**(vm.get("status") or {}), **recorded.changes}
                self._assumed[key] = {**vm, "status": status}
        if isinstance(decision, Unschedulable):
            metrics.UNSCHEDULABLE.inc()
            await self._carry_out(vm, lifecycle.unschedulable(vm, decision.message), index)
            return False
        self.placement_first.wait_for_placement(key)  # until its write is back
        try:
            # The Event waits with the Secret and fragments for the other VMs' placements
            # (it is one more write); it is posted when this pass goes on or ends.
            now = [a for a in actions if not isinstance(a, lifecycle.PostEvent)]
            later = [a for a in actions if isinstance(a, lifecycle.PostEvent)]
            await self._carry_out(vm, now, index)
            held = self._held_events.get(key)
            if held is None or held[0]["metadata"].get("uid") != meta.get("uid"):
                held = self._held_events[key] = (vm, [])
            held[1].extend(later)
        finally:
            del self._assumed[key]  # written (and in the cache), or failed: room released
            self.placement_first.done(key)
        metrics.PLACEMENTS.inc()
        return True

    async def _guard(self, vm: JsonObject) -> bool:
        """Put the finalizer on the VM before it owns anything (its Secret, its fragments), so
        a deletion always waits for them to stop. False if the VM is gone, being deleted,
        replaced by a namesake or given a new spec since the pass decided (nothing is made
        for it; the next pass decides). Updates vm's metadata in place. ApiException: 409
        after GUARD_ATTEMPTS conflicts in a row, a 422 not caused by a deletion as the API
        server gave it, or any other refusal.

        The finalizer is ours, not Kopf's: Kopf would add it on the VM's first event, one
        more write (and a JSON patch that fails once the placement has changed the VM) in the
        burst where placements go first. It is added here, at the VM's materialisation turn,
        by a merge patch conditional on the resourceVersion, retried on a conflict with the
        VM as read again."""
        decided = meta = vm["metadata"]  # what this pass decided on
        namespace, name = meta["namespace"], meta["name"]
        newest = self.cache.vms.get(namespace, name)  # this pass's own status writes are in
        if newest is not None and newest["metadata"].get("uid") == meta.get("uid"):
            meta = newest["metadata"]
        for _attempt in range(GUARD_ATTEMPTS):
            finalizers = list(meta.get("finalizers") or [])
            if FINALIZER in finalizers or meta.get("deletionTimestamp"):
                # being deleted, or re-specified since the decision: the next pass decides
                return _unchanged(decided, meta)
            try:
                written = await self._call(
                    self.kube.set_vm_finalizers,
                    namespace,
                    name,
                    [*finalizers, FINALIZER],
                    meta["resourceVersion"],
                )
            except ApiException as err:
                if err.status not in (CONFLICT, INVALID):
                    raise
                written = await self._call(self.kube.get_vm, namespace, name)
                fresh = (written or {}).get("metadata", {})
                if (
                    err.status == INVALID
                    and written is not None
                    and not fresh.get("deletionTimestamp")
                ):
                    raise  # refused for another reason than a deletion: say that one
            if written is None or written["metadata"].get("uid") != decided.get("uid"):
                return False  # gone (or replaced by a namesake: its own pass decides)
            self.cache.vms.assume(written)
            meta = vm["metadata"] = written["metadata"]
        raise ApiException(
            status=CONFLICT, reason="the VM kept changing while its finalizer was added"
        )

    async def _materialise(self, vm: JsonObject, placed: list[FragmentSummary]) -> bool:
        """The Secret and every missing VMFragment of the recorded placement; True if this
        pass created any fragment. A name held by an object this VM does not own is
        reported (nothing is adopted, deleted or started)."""
        ns, uid = vm["metadata"]["namespace"], vm["metadata"]["uid"]
        spec = SpanningVMSpec.model_validate(vm["spec"])
        fragments = self._fragments(vm)
        # Named after the VM's uid: a 409 here is this VM's own Secret from an earlier pass.
        await self._call(self.kube.create_secret, ns, fabric_secret(vm))
        taken: list[JsonObject] = []
        made = False
        exist = set(fragments)
        for index, body in fragment_bodies(vm, spec, placed, fragments).items():
            hold_back_peers(body, exist, len(placed))
            created = await self._call(self.kube.create_fragment, ns, body)
            if created is None:  # ours would be in `fragments` unless the cache lags
                other = await self._call(self.kube.get_fragment, ns, placed[index].name)
                if other is not None and not owned_by(other, uid):
                    taken.append(other["metadata"])
                elif other is not None:
                    self.cache.fragments.assume(other)
                    exist.add(index)
                    made = True
                continue
            self.cache.fragments.assume(created)
            exist.add(index)
            made = True
            metrics.FRAGMENTS_CREATED.inc()
            self._creates += 1
            log.info("[%s] created fragment %s", _vm_ref(vm), placed[index].name)
            self.hooks.after_fragment_create(self._creates)
        if taken:
            await self._carry_out(
                vm, lifecycle.name_taken(vm, "VMFragment", taken), ClusterIndex([])
            )
            return False
        return made

    # -- deletion ----------------------------------------------------------------------------
    async def finalize(self, namespace: str, name: str) -> None:
        """Stop the fragments; WaitForStop until they report stopped or the grace runs out."""
        async with self._lock(namespace, name):
            vm = self.cache.vms.get(namespace, name) or await self._call(
                self.kube.get_vm, namespace, name
            )
            if vm is None:
                return
            actions = lifecycle.decide_deletion(
                vm, self._fragments(vm), datetime.now(UTC), self.config.deletion_grace
            )
            await self._carry_out(vm, actions, ClusterIndex([]))

    async def _patch_fragment(self, vm: JsonObject, name: str, patch: JsonObject) -> None:
        ns = vm["metadata"]["namespace"]
        patched = await self._call(self.kube.patch_fragment, ns, name, patch)
        if patched is not None:
            self.cache.fragments.assume(patched)

    async def _delete_fragments(self, vm: JsonObject, names: Sequence[str]) -> None:
        ns = vm["metadata"]["namespace"]
        for name in names:
            await self._call(self.kube.delete_fragment, ns, name)
            self.cache.fragments.forget(ns, name)

    # -- writing -----------------------------------------------------------------------------
    async def _write(
        self,
        vm: JsonObject,
        changes: JsonObject,
        conditions: Sequence[ConditionSpec] = (),
    ) -> None:
        """Write status as `status_write.next_status` builds it from the API model: a merge
        patch of what changed, nothing if nothing does."""
        status = vm.get("status") or {}
        new = next_status(vm, changes, conditions, datetime.now(UTC)).to_api()
        patch = merge_patch(own_status(vm), new)
        if not patch:
            return
        meta = vm["metadata"]
        written = await self._call(
            self.kube.patch_vm_status, meta["namespace"], meta["name"], patch
        )
        vm["status"] = {**{k: v for k, v in status.items() if k not in FIELDS}, **new}
        if written is not None:
            self.cache.vms.assume(written)
