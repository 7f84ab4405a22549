"""Seals each VMFragment's fabric key to its node (see spanvm.sealing): on every fragment
event, a fragment whose annotation is missing or sealed to a key its node no longer publishes
gets the VM's key from the fabric Secret, sealed to the node's current public key. The agent
reports a fragment it cannot open as Pending, and that status change brings it back here."""

import asyncio
import logging
from typing import Any, cast

import kopf

from spanvm.api.constants import (
    FABRIC_PUBLIC_KEY_ANNOTATION,
    FABRIC_SECRET_KEY,
    GROUP,
    SEALED_FABRIC_KEY_ANNOTATION,
    VERSION,
    VMFRAGMENT_PLURAL,
)
from spanvm.kube import JsonObject, Kube
from spanvm.sealing import fingerprint, seal, sealed_to

log = logging.getLogger("spanvm.operator")


def sealed_key_patch(kube: Kube, fragment: JsonObject) -> JsonObject | None:
    """The metadata patch that (re)seals the fragment's key, or None if none is needed (or
    possible yet: no node key published, no Secret)."""
    meta, spec = fragment["metadata"], fragment.get("spec") or {}
    node_name = spec.get("nodeName")
    if meta.get("deletionTimestamp") or not node_name:
        return None
    node = kube.get_node(node_name) or {}
    public = ((node.get("metadata") or {}).get("annotations") or {}).get(
        FABRIC_PUBLIC_KEY_ANNOTATION
    )
    if not public:
        return None
    current = (meta.get("annotations") or {}).get(SEALED_FABRIC_KEY_ANNOTATION)
    if current and sealed_to(current) == fingerprint(public):
        return None
    ref = spec.get("secretRef") or {}
    key = kube.read_secret_key(
        meta["namespace"], ref.get("name", ""), ref.get("key") or FABRIC_SECRET_KEY
    )
    if key is None:
        return None
    return {"metadata": {"annotations": {SEALED_FABRIC_KEY_ANNOTATION: seal(key, public)}}}


def register(registry: kopf.OperatorRegistry, kube: Kube) -> None:
    """Add the courier's fragment event handler to `registry`."""

    @kopf.on.event(GROUP, VERSION, VMFRAGMENT_PLURAL, registry=registry)
    async def seal_fabric_key(body: kopf.Body, **_: Any) -> None:
        fragment = cast(JsonObject, dict(body))
        patch = await asyncio.to_thread(sealed_key_patch, kube, fragment)
        if patch is None:
            return
        meta = fragment["metadata"]
        await asyncio.to_thread(kube.patch_fragment, meta["namespace"], meta["name"], patch)
        log.info(
            "[%s/%s] fabric key sealed to node %s",
            meta["namespace"],
            meta["name"],
            fragment["spec"]["nodeName"],
        )
