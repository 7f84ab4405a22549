"""Kopf handlers: every trigger (a VM first seen or changed, the periodic recheck, a fragment's
change) runs the same idempotent reconciliation; deletion waits for fragments behind the
finalizer the operator puts on a VM before it owns anything.

A SpanningVM's changes come through a watch-event handler rather than Kopf's create, resume
and update handlers: those keep the last handled spec in an annotation, one more write per
VM and per change, to tell an update from a creation, a distinction the reconciliation does
not need. `Triggers` tells which events ask for a pass; Kopf keeps no diff-base at all.
"""

import logging
import os
import socket
from typing import Any, cast

import kopf

from spanvm.api.constants import (
    FINALIZER,
    GROUP,
    SPANNINGVM_PLURAL,
    VERSION,
    VMFRAGMENT_PLURAL,
)
from spanvm.controller import key_courier
from spanvm.controller.fragments import owner_vm_name
from spanvm.controller.recheck import Recheck
from spanvm.controller.reconcile import OperatorConfig, Reconciler, WaitForStop
from spanvm.kube import JsonObject

log = logging.getLogger("spanvm.operator")
KOPF_PREFIX = "spanvm.io"
EVENT_COMPONENT = "spanvm-operator"  # Kopf's own bookkeeping annotations live under our group


def reporting_instance() -> str:
    """Who this operator is, for its Events: the pod (POD_NAME, set by the chart from the
    downward API), else the host name."""
    return os.environ.get("POD_NAME") or socket.gethostname()


class NoDiffBase(kopf.DiffBaseStorage):
    """Kopf remembers no last-handled state: no SpanningVM handler asks for a diff (only the
    deletion handler is Kopf's to track, and deletion is told by deletionTimestamp)."""

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


class Triggers:
    """Which SpanningVM watch events ask for a pass: the first one of a VM in this process
    (created, or there when the operator starts) and any change of its spec (generation),
    labels or annotations (verbs, pause). A change of status alone is the echo of the
    operator's own write and asks for nothing; `Recheck` looks again every few seconds."""

    def __init__(self) -> None:
        self._handled: dict[str, tuple[Any, ...]] = {}  # VM uid -> essence last handled

    @staticmethod
    def _essence(obj: JsonObject) -> tuple[Any, ...]:
        meta = obj["metadata"]
        return (meta.get("generation"), meta.get("labels"), meta.get("annotations"))

    def wants_pass(self, obj: JsonObject) -> bool:
        """Whether this event asks for a pass (then it is taken as handled)."""
        uid, essence = obj["metadata"]["uid"], self._essence(obj)
        if self._handled.get(uid) == essence:
            return False
        self._handled[uid] = essence
        return True

    def forget(self, obj: JsonObject) -> None:
        """The VM is gone, or its pass failed (the next event of it asks for one again)."""
        self._handled.pop(obj["metadata"]["uid"], None)


def guarded(obj: JsonObject) -> bool:
    """Whether the operator has put its finalizer on the VM (`Reconciler._guard`, before the
    VM owns anything): only then is its deletion the deletion handler's to carry out."""
    return FINALIZER in (obj["metadata"].get("finalizers") or [])


def _guarded_body(body: kopf.Body, **_: Any) -> bool:
    return guarded(cast(JsonObject, body))


def post_event(obj: JsonObject, type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event on obj, through Kopf's poster (batched, never blocks a handler)."""
    kopf.event(cast(kopf.Body, obj), type=type_, reason=reason, message=message[:1000])


def build_registry(reconciler: Reconciler, config: OperatorConfig) -> kopf.OperatorRegistry:
    """A registry with spanvm's handlers (no module-level state: tests build their own)."""
    registry = kopf.OperatorRegistry()
    vms = (GROUP, VERSION, SPANNINGVM_PLURAL)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.posting.level = logging.WARNING  # our own events say what happened
        # Events say who posted them (`kubectl get events` SOURCE, `describe` From): this
        # operator and its pod, not Kopf's defaults `kopf` and `dev`.
        settings.posting.reporting_component = EVENT_COMPONENT
        settings.posting.reporting_instance = reporting_instance()
        settings.posting.event_name_prefix = f"{EVENT_COMPONENT}-"
        settings.watching.server_timeout = 120
        settings.networking.request_timeout = 30

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info: kopf.ConnectionInfo | None = kopf.login_with_service_account(
            **kwargs
        ) or kopf.login_with_kubeconfig(**kwargs)
        return info

    triggers = Triggers()
    # Started by the first SpanningVM event (nothing to look at before), from a handler:
    # its passes post Events through Kopf's poster, which only a handler's context reaches.
    recheck = Recheck(reconciler, config.namespaces, config.timer_interval)

    @kopf.on.event(*vms, registry=registry)
    async def changed(type: str | None, body: kopf.Body, **_: Any) -> None:
        recheck.start()
        vm = cast(JsonObject, dict(body))
        if type == "DELETED":
            triggers.forget(vm)
            reconciler.gone(vm)
            return
        reconciler.seen(vm)
        namespace, name = body.metadata.namespace, body.metadata.name
        if namespace is None or name is None:
            return
        if not triggers.wants_pass(vm):
            return
        try:
            await reconciler.reconcile(namespace, name)
        except Exception:
            triggers.forget(vm)
            raise

    @kopf.on.cleanup(registry=registry)
    async def stop_rechecks(**_: Any) -> None:
        await recheck.stop()

    @kopf.on.event(GROUP, VERSION, VMFRAGMENT_PLURAL, registry=registry)
    async def fragment_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type != "DELETED":
            reconciler.seen(cast(JsonObject, dict(body)))
        vm = owner_vm_name(cast(JsonObject, body))
        if vm and body.metadata.namespace:
            await reconciler.reconcile(body.metadata.namespace, vm)

    key_courier.register(
        registry, reconciler.kube, lambda node: reconciler.cache.nodes.get("", node)
    )

    # Only a VM with the finalizer is the handler's (Kopf then keeps the finalizer until the
    # handler is done, and adds none of its own: the VM has it); a VM deleted before it has
    # one owns nothing and simply goes.
    @kopf.on.delete(*vms, registry=registry, when=_guarded_body)
    async def deleting(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        """Stop the fragments, then let the finalizer go. A deletion that keeps failing (an
        API error, a bug) still ends after --deletion-grace: a VM is always deletable."""
        assert namespace is not None
        try:
            await reconciler.finalize(namespace, name)
        except WaitForStop as wait:
            raise kopf.TemporaryError(str(wait), delay=1) from None
        except Exception as err:
            vm = cast(JsonObject, body)
            waited = reconciler.deletion_overdue(vm)
            if waited is None:
                raise kopf.TemporaryError(f"deletion failed ({err}); retrying", delay=2) from err
            message = (
                f"deletion failed for {waited:.0f}s ({err}); the finalizer is removed anyway:"
                " check for leftover VMFragments"
            )
            post_event(vm, "Warning", "ForcedDeletion", message)
            log.error("[%s/%s] %s", namespace, name, message)

    return registry
