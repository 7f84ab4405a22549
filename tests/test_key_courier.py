"""The key courier without an API server: a fragment whose key is sealed to the key its node
publishes in the operator's cache costs no request; otherwise the Node is read fresh (the
cache may lag a key just published) and the key is sealed to it."""

from typing import Any

import pytest
from nacl.public import PrivateKey

from spanvm.api.constants import FABRIC_PUBLIC_KEY_ANNOTATION, SEALED_FABRIC_KEY_ANNOTATION
from spanvm.controller.key_courier import sealed_key_patch
from spanvm.kube import JsonObject, Kube
from spanvm.sealing import open_sealed, public_text, seal

FABRIC_KEY = b"k" * 32


def node(key: PrivateKey | None) -> JsonObject:
    annotations = {FABRIC_PUBLIC_KEY_ANNOTATION: public_text(key)} if key else {}
    return {"metadata": {"name": "n1", "annotations": annotations}}


def fragment(sealed: str | None = None) -> JsonObject:
    annotations = {SEALED_FABRIC_KEY_ANNOTATION: sealed} if sealed else {}
    return {
        "metadata": {"name": "vm-0", "namespace": "ns", "annotations": annotations},
        "spec": {"nodeName": "n1", "secretRef": {"name": "vm-fabric", "key": "fabric-key"}},
    }


class Api:
    """What the courier may ask the API server, counted."""

    def __init__(self, node_object: JsonObject) -> None:
        self.node, self.calls = node_object, []  # type: ignore[var-annotated]

    def get_node(self, name: str) -> JsonObject:
        self.calls.append(("node", name))
        return self.node

    def read_secret_key(self, namespace: str, name: str, key: str) -> bytes:
        self.calls.append(("secret", f"{namespace}/{name}/{key}"))
        return FABRIC_KEY


def courier(api: Api, fragment_object: JsonObject, cached: JsonObject | None) -> Any:
    kube: Kube = api  # type: ignore[assignment]
    return sealed_key_patch(kube, fragment_object, lambda _name: cached)


def test_sealed_to_the_cached_nodes_key_costs_no_request() -> None:
    key = PrivateKey.generate()
    api = Api(node(key))
    sealed = seal(FABRIC_KEY, public_text(key))
    assert courier(api, fragment(sealed), node(key)) is None
    assert api.calls == []


@pytest.mark.parametrize("cached_key", ["none", "old"])
def test_a_stale_or_missing_cached_key_is_checked_against_the_api_and_sealed(
    cached_key: str,
) -> None:
    old, new = PrivateKey.generate(), PrivateKey.generate()
    api = Api(node(new))  # the node published a new key the cache has not seen yet
    cached = node(None) if cached_key == "none" else node(old)
    patch = courier(api, fragment(), cached)
    assert api.calls == [("node", "n1"), ("secret", "ns/vm-fabric/fabric-key")]
    sealed = patch["metadata"]["annotations"][SEALED_FABRIC_KEY_ANNOTATION]
    assert open_sealed(sealed, new) == FABRIC_KEY


def test_a_fragment_its_agent_reports_pending_is_checked_against_the_api() -> None:
    """The node's key changed and the cache has not seen it: the agent reports the fragment
    Pending (it cannot open the key), and that report is not answered from the cache."""
    old, new = PrivateKey.generate(), PrivateKey.generate()
    api = Api(node(new))
    stale = fragment(seal(FABRIC_KEY, public_text(old)))
    assert courier(api, stale, node(old)) is None and api.calls == []  # no report yet
    stale["status"] = {"phase": "Pending", "message": "waiting for the operator to reseal"}
    patch = courier(api, stale, node(old))
    assert api.calls == [("node", "n1"), ("secret", "ns/vm-fabric/fabric-key")]
    assert open_sealed(patch["metadata"]["annotations"][SEALED_FABRIC_KEY_ANNOTATION], new)


def test_sealed_to_the_current_key_though_the_cache_lags_writes_nothing() -> None:
    key = PrivateKey.generate()
    api = Api(node(key))
    patch = courier(api, fragment(seal(FABRIC_KEY, public_text(key))), None)
    assert patch is None and api.calls == [("node", "n1")]


def test_a_node_without_a_key_gets_nothing_sealed() -> None:
    api = Api(node(None))
    assert courier(api, fragment(), None) is None
    assert api.calls == [("node", "n1")]
