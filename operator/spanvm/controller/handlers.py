"""Kopf handlers: every trigger (create, resume, update, a timer, a fragment's change) runs
the same idempotent reconciliation; deletion waits for fragments behind a finalizer."""

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
from spanvm.controller.reconcile import OperatorConfig, Reconciler, WaitForStop
from spanvm.kube import JsonObject

log = logging.getLogger("spanvm.operator")
KOPF_PREFIX = "spanvm.io"
EVENT_COMPONENT = "spanvm-operator"  # Kopf's own bookkeeping annotations live under our group


def reporting_instance() -> str:
    """Who this operator is, for its Events: the pod (POD_NAME, set by the chart from the
    downward API), else the host name."""
    return os.environ.get("POD_NAME") or socket.gethostname()


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
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=KOPF_PREFIX, key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING  # our own events say what happened
        # Events say who posted them (`kubectl get events` SOURCE, `describe` From): this
        # operator and its pod, not Kopf's defaults `kopf` and `dev`.
        settings.posting.reporting_component = EVENT_COMPONENT
        settings.posting.reporting_instance = reporting_instance()
        settings.posting.event_name_prefix = f"{EVENT_COMPONENT}-"
        # A VM being deleted keeps its finalizer until its timer has stopped. Kopf's default
        # is to look again only after 60 s when the timer is mid-pass at that moment (what
        # made some deletions take a minute): wait briefly, then poll twice a second.
        settings.background.instant_exit_timeout = 0.5
        settings.background.cancellation_polling = 0.5
        settings.watching.server_timeout = 120
        settings.networking.request_timeout = 30

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info: kopf.ConnectionInfo | None = kopf.login_with_service_account(
            **kwargs
        ) or kopf.login_with_kubeconfig(**kwargs)
        return info

    @kopf.on.resume(*vms, registry=registry)
    @kopf.on.create(*vms, registry=registry)
    @kopf.on.update(*vms, registry=registry)
    async def changed(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        assert namespace is not None  # SpanningVM is namespaced
        reconciler.seen(cast(JsonObject, dict(body)))
        await reconciler.reconcile(namespace, name)

    @kopf.timer(*vms, registry=registry, interval=config.timer_interval, sharp=False)
    async def recheck(namespace: str | None, name: str, **kwargs: Any) -> None:
        """Pending VMs get placed when capacity appears; lost nodes are noticed."""
        assert namespace is not None
        if not kwargs.get("stopped"):  # stopped: being deleted, the delete handler owns it
            await reconciler.reconcile(namespace, name)

    @kopf.on.event(GROUP, VERSION, VMFRAGMENT_PLURAL, registry=registry)
    async def fragment_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type != "DELETED":
            reconciler.seen(cast(JsonObject, dict(body)))
        vm = owner_vm_name(cast(JsonObject, body))
        if vm and body.metadata.namespace:
            await reconciler.reconcile(body.metadata.namespace, vm)

    key_courier.register(registry, reconciler.kube)

    @kopf.on.delete(*vms, registry=registry)
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
