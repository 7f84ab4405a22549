"""The operator's own finalizer (`Reconciler._guard`) and its periodic look at every VM
(`Recheck`), without an API server: the Kube calls are answered by a fake that keeps one
SpanningVM with a resourceVersion, as the API server does for a merge patch that carries one
(409 when it is stale, 422 for a new finalizer on a VM being deleted)."""

import asyncio
import copy
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from spanvm.api.constants import FINALIZER
from spanvm.controller.cache import ClusterCache
from spanvm.controller.handlers import build_registry
from spanvm.controller.recheck import Recheck
from spanvm.controller.reconcile import OperatorConfig, Reconciler
from spanvm.kube import JsonObject, Kube


def vm(name: str = "vm1", namespace: str = "ns", **meta: Any) -> JsonObject:
    metadata = {"name": name, "namespace": namespace, "uid": f"uid-{name}", "resourceVersion": "1"}
    return {"metadata": {**metadata, **meta}, "spec": {}}


def no_list(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("the caches are filled by the test, never listed")


class Api:
    """One SpanningVM as the API server keeps it; every call counted."""

    custom = SimpleNamespace(list_cluster_custom_object=no_list)
    core = SimpleNamespace(list_node=no_list)
    coordination = SimpleNamespace(list_namespaced_lease=no_list)

    def __init__(self, stored: JsonObject | None) -> None:
        self.stored, self.calls = stored, []  # type: ignore[var-annotated]

    def change(self, **meta: Any) -> None:
        """Someone else writes the VM: a new resourceVersion."""
        assert self.stored is not None
        self.stored["metadata"].update(meta)
        version = int(self.stored["metadata"]["resourceVersion"]) + 1
        self.stored["metadata"]["resourceVersion"] = str(version)

    def set_vm_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> JsonObject | None:
        self.calls.append(("patch", resource_version))
        if self.stored is None:
            return None
        meta = self.stored["metadata"]
        if meta["resourceVersion"] != resource_version:
            raise ApiException(status=409, reason="Conflict")
        if meta.get("deletionTimestamp") and set(finalizers) - set(meta.get("finalizers") or []):
            raise ApiException(status=422, reason="no new finalizers while deleting")
        self.change(finalizers=finalizers)
        return copy.deepcopy(self.stored)

    def get_vm(self, namespace: str, name: str) -> JsonObject | None:
        self.calls.append(("get", name))
        return copy.deepcopy(self.stored)


def reconciler(api: Api, *cached: JsonObject) -> Reconciler:
    kube: Kube = api  # type: ignore[assignment]
    cache = ClusterCache(kube, "spanvm-system")
    for obj in cached:
        cache.vms.assume(copy.deepcopy(obj))
    return Reconciler(kube, OperatorConfig("spanvm-system"), lambda *_: None, cache)


def guard(r: Reconciler, obj: JsonObject) -> bool:
    return asyncio.run(r._guard(obj))


def test_the_finalizer_is_added_once_with_the_version_the_pass_wrote_last() -> None:
    api = Api(vm(resourceVersion="7"))
    r = reconciler(api, api.stored)  # type: ignore[arg-type]
    seen = vm(resourceVersion="5")  # the pass started from an older copy, then wrote status
    assert guard(r, seen)
    assert api.calls == [("patch", "7")]  # no 409: the cache has the pass's own write
    assert seen["metadata"]["finalizers"] == [FINALIZER]
    assert r.cache.vms.get("ns", "vm1")["metadata"]["finalizers"] == [FINALIZER]  # type: ignore[index]
    assert guard(r, seen) and len(api.calls) == 1  # already there: no request


def test_a_conflict_is_retried_against_the_vm_read_again_keeping_others_finalizers() -> None:
    api = Api(vm())
    r = reconciler(api)
    seen = vm()
    api.change(finalizers=["example.com/other"])  # written after the operator read it
    assert guard(r, seen)
    assert [c[0] for c in api.calls] == ["patch", "get", "patch"]
    assert api.stored["metadata"]["finalizers"] == ["example.com/other", FINALIZER]  # type: ignore[index]


@pytest.mark.parametrize("how", ["deleting", "gone", "replaced"])
def test_a_vm_deleted_or_replaced_gets_no_finalizer_and_nothing_is_made(how: str) -> None:
    api = Api(vm())
    r = reconciler(api)
    seen = vm()
    if how == "deleting":
        api.change(deletionTimestamp="2026-11-30T06:00:00Z")
    elif how == "gone":
        api.stored = None
    else:
        api.stored = vm(uid="uid-namesake", resourceVersion="9")
    assert not guard(r, seen)
    assert FINALIZER not in ((api.stored or {}).get("metadata", {}).get("finalizers") or [])


def test_a_vm_that_keeps_changing_is_an_api_error_for_the_pass() -> None:
    class Busy(Api):
        def get_vm(self, namespace: str, name: str) -> JsonObject | None:
            read = super().get_vm(namespace, name)
            self.change()  # changed again before the next try
            return read

    api = Busy(vm())
    r = reconciler(api)
    api.change()
    with pytest.raises(ApiException) as err:
        guard(r, vm())
    assert err.value.status == 409 and "kept changing" in str(err.value)


def test_a_sweep_passes_every_handled_vm_not_deleting_and_not_busy() -> None:
    async def scenario() -> tuple[int, int, list[tuple[str, str]]]:
        objs = [
            vm("a"),
            vm("b"),
            vm("c", deletionTimestamp="2026-11-30T06:00:00Z"),
            vm("d", namespace="elsewhere"),
            vm("e"),
        ]
        r = reconciler(Api(None), *objs)
        passed: list[tuple[str, str]] = []
        release = asyncio.Event()

        async def reconcile(namespace: str, name: str) -> None:
            passed.append((namespace, name))
            await release.wait()

        r.reconcile = reconcile  # type: ignore[method-assign]
        async with r._lock("ns", "e"):
            recheck = Recheck(r, ["ns"], interval=60)
            first = recheck.sweep()
            await asyncio.sleep(0)
            again = recheck.sweep()  # a and b still in their passes: not started twice
        release.set()
        await recheck.stop()
        return first, again, sorted(passed)

    first, again, passed = asyncio.run(scenario())
    assert (first, again) == (2, 0)
    assert passed == [("ns", "a"), ("ns", "b")]


def test_recheck_runs_sweeps_until_stopped_and_survives_a_failing_pass() -> None:
    async def scenario() -> int:
        r = reconciler(Api(None), vm("a"))
        calls = 0

        async def reconcile(namespace: str, name: str) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("the API server is away")

        r.reconcile = reconcile  # type: ignore[method-assign]
        recheck = Recheck(r, [], interval=0.01)
        recheck.start()
        recheck.start()  # idempotent: one loop
        await asyncio.sleep(0.2)
        await recheck.stop()
        stopped_at = calls
        await asyncio.sleep(0.05)
        assert calls == stopped_at
        return calls

    assert asyncio.run(scenario()) >= 3


def test_seen_takes_a_stale_first_event_for_what_the_cache_has_since() -> None:
    """The periodic recheck may place a VM before Kopf hands over its first event; that
    event (no status) must not count the VM as waiting again (held work would wait 10 s)."""
    placed = vm(resourceVersion="5")
    placed["status"] = {"phase": "Scheduling"}
    r = reconciler(Api(None), placed)
    r.seen({"kind": "SpanningVM", **vm(resourceVersion="3")})
    assert r.placement_first.waiting == 0
    r.seen({"kind": "SpanningVM", **vm("new", resourceVersion="4")})  # really new: waits
    assert r.placement_first.waiting == 1


def test_a_vm_re_specified_since_the_decision_is_guarded_but_not_materialised() -> None:
    api = Api(vm(generation=2))
    r = reconciler(api, api.stored)  # type: ignore[arg-type]
    assert not guard(r, vm(generation=1))  # the pass decided on generation 1
    assert api.stored["metadata"]["finalizers"] == [FINALIZER]  # type: ignore[index]


def test_a_finalizer_refused_for_another_reason_than_a_deletion_is_reported_as_it_is() -> None:
    class Refusing(Api):
        def set_vm_finalizers(self, *args: Any) -> JsonObject | None:
            self.calls.append(("patch", args[-1]))
            raise ApiException(status=422, reason="denied by an admission policy")

    api = Refusing(vm())
    with pytest.raises(ApiException) as err:
        guard(reconciler(api), vm())
    assert err.value.status == 422 and "admission" in str(err.value)
    assert [c[0] for c in api.calls] == ["patch", "get"]


def test_kopf_is_given_no_reason_to_add_a_finalizer_of_its_own() -> None:
    """Kopf puts its finalizer on every object a timer, a daemon or a deletion handler
    matches; for SpanningVMs only VMs that already carry the operator's may match."""
    r = reconciler(Api(None))
    registry = build_registry(r, OperatorConfig("spanvm-system"))
    assert registry._spawning.get_all_handlers() == []
    changing = registry._changing.get_all_handlers()
    assert changing, "the deletion handler"
    for handler in changing:
        assert handler.when is not None
        assert not handler.when(body=vm())  # type: ignore[call-arg]
        assert handler.when(body=vm(finalizers=[FINALIZER]))  # type: ignore[call-arg]


def test_a_failing_sweep_does_not_end_the_recheck_and_it_stays_stopped() -> None:
    async def scenario() -> int:
        r = reconciler(Api(None), vm("a"))
        recheck = Recheck(r, [], interval=0.01)
        sweeps = 0

        def sweep() -> int:
            nonlocal sweeps
            sweeps += 1
            raise RuntimeError("a bug")

        recheck.sweep = sweep  # type: ignore[method-assign]
        recheck.start()
        await asyncio.sleep(0.1)
        await recheck.stop()
        recheck.start()  # a handler running late in the shutdown
        assert recheck._task is None
        return sweeps

    assert asyncio.run(scenario()) >= 3
