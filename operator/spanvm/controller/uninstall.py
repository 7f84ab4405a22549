"""`spanvm uninstall`: what the chart's pre-delete hook runs before `helm uninstall` removes
the operator. Deletes every SpanningVM while the operator still runs (it stops their
fragments and releases its finalizer), waits for them to go, and removes the finalizer of any
left after the timeout, so no VM is stuck on spanvm.io/finalizer once the operator is gone.
"""

import logging
import time
from functools import partial
from typing import Any

from spanvm.api.constants import FINALIZER, GROUP, SPANNINGVM_PLURAL, VERSION
from spanvm.kube import NOT_FOUND, Kube, unless_status

log = logging.getLogger("spanvm.uninstall")


def _ref(vm: dict[str, Any]) -> tuple[str, str]:
    return vm["metadata"]["namespace"], vm["metadata"]["name"]


def _vms(kube: Kube, namespaces: list[str]) -> list[dict[str, Any]]:
    if not namespaces:
        return kube.list_vms(None)
    return [vm for ns in namespaces for vm in kube.list_vms(ns)]


def delete_all(
    kube: Kube, namespaces: list[str], *, timeout: float, poll: float = 1.0
) -> list[tuple[str, str]]:
    """Delete every SpanningVM (of `namespaces`, the operator's; empty: all), then after
    `timeout` seconds drop the finalizer of those left. Returns the VMs whose finalizer had
    to be removed."""
    for vm in _vms(kube, namespaces):
        namespace, name = _ref(vm)
        log.info("deleting SpanningVM %s/%s", namespace, name)
        delete = partial(
            kube.custom.delete_namespaced_custom_object,
            GROUP, VERSION, namespace, SPANNINGVM_PLURAL, name,
        )  # fmt: skip
        unless_status(delete, NOT_FOUND)
    deadline = time.monotonic() + timeout
    while (left := _vms(kube, namespaces)) and time.monotonic() < deadline:
        time.sleep(poll)
    forced = []
    for vm in left:
        namespace, name = _ref(vm)
        finalizers = [f for f in vm["metadata"].get("finalizers") or [] if f != FINALIZER]
        log.warning(
            "SpanningVM %s/%s still there after %.0fs (no operator?): removing %s; its"
            " fragments' processes may still run on their nodes",
            namespace,
            name,
            timeout,
            FINALIZER,
        )
        release = partial(
            kube.custom.patch_namespaced_custom_object,
            GROUP, VERSION, namespace, SPANNINGVM_PLURAL, name,
            {"metadata": {"finalizers": finalizers or None}},
        )  # fmt: skip
        unless_status(release, NOT_FOUND)
        forced.append((namespace, name))
    return forced
