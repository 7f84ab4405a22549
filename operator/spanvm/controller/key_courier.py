"""Seals each VMFragment's fabric key to its node (see spanvm.sealing): on every fragment
event, a fragment whose annotation is missing or sealed to a key its node no longer publishes
gets the VM's key from the fabric Secret, sealed to the node's current public key. The agent
reports a fragment it cannot open as Pending, and that status change brings it back here.

Most fragment events (an agent's status reports) need nothing: the fragment's key is sealed to
the key its node publishes in the operator's Node cache, and no request is made. Before
sealing, and whenever the agent reports the fragment Pending (it may be waiting for a reseal
to a key it has just published, which the cache may not hold yet), the Node is read from the
API server."""

import asyncio
import logging
from collections.abc import Callable
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
from spanvm.api.phases import FragmentPhase
from spanvm.kube import JsonObject, Kube
from spanvm.sealing import fingerprint, seal, sealed_to

log = logging.getLogger("spanvm.operator")


NodeLookup = Callable[[str], JsonObject | None]


def _public_key(node: JsonObject | None) -> str | None:
    """The fabric public key the Node publishes, if any."""
    annotations = ((node or {}).get("metadata") or {}).get("annotations") or {}
    key = annotations.get(FABRIC_PUBLIC_KEY_ANNOTATION)
    return str(key) if key else None


def _sealed_to_key(current: str | None, public: str | None) -> bool:
    """Whether the sealed annotation `current` was sealed to the public key `public`."""
    return bool(current and public and sealed_to(current) == fingerprint(public))


def sealed_key_patch(
    kube: Kube, fragment: JsonObject, cached_node: NodeLookup = lambda _name: None
) -> JsonObject | None:
    """The metadata patch that (re)seals the fragment's key, or None if none is needed (or
    possible yet: no node key published, no Secret). `cached_node` looks a Node up in the
    operator's cache: if the fragment's key is sealed to the key found there and the agent
    does not report the fragment Pending, no request is made; otherwise the Node is read from
    the API server (and the Secret, to seal)."""
    meta, spec = fragment["metadata"], fragment.get("spec") or {}
    node_name = spec.get("nodeName")
    if meta.get("deletionTimestamp") or not node_name:
        return None
    current = (meta.get("annotations") or {}).get(SEALED_FABRIC_KEY_ANNOTATION)
    waiting = (fragment.get("status") or {}).get("phase") == FragmentPhase.PENDING
    if not waiting and _sealed_to_key(current, _public_key(cached_node(node_name))):
        return None
    public = _public_key(kube.get_node(node_name))
    if not public or _sealed_to_key(current, public):
        return None
    ref = spec.get("secretRef") or {}
    key = kube.read_secret_key(
        meta["namespace"], ref.get("name", ""), ref.get("key") or FABRIC_SECRET_KEY
    )
    if key is None:
        return None
    return {"metadata": {"annotations": {SEALED_FABRIC_KEY_ANNOTATION: seal(key, public)}}}


def register(registry: kopf.OperatorRegistry, kube: Kube, cached_node: NodeLookup) -> None:
    """Add the courier's fragment event handler to `registry`."""

    @kopf.on.event(GROUP, VERSION, VMFRAGMENT_PLURAL, registry=registry)
    async def seal_fabric_key(body: kopf.Body, **_: Any) -> None:
        fragment = cast(JsonObject, dict(body))
        patch = await asyncio.to_thread(sealed_key_patch, kube, fragment, cached_node)
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
