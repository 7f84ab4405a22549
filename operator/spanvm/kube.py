"""One thin client for the Kubernetes objects spanvm reads and writes.

Shared by the operator, the node agent and the CLI: the kubeconfig or in-cluster login, the
spanvm custom objects, Nodes, Leases, Secrets and Events, with "already exists" and "not
found" turned into return values so every caller can be idempotent. Blocking (the official
client); async callers run it in a thread.
"""

import base64
import json
from collections.abc import Callable
from typing import Any, TypeVar, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from spanvm.api.constants import GROUP, SPANNINGVM_PLURAL, VERSION, VMFRAGMENT_PLURAL
from spanvm.rfc3339 import micro_time

JsonObject = dict[str, Any]
T = TypeVar("T")
NOT_FOUND = 404
CONFLICT = 409
INVALID = 422  # e.g. a new finalizer on an object being deleted
CONNECTIONS = 32


def unless_status(call: Callable[[], T], *statuses: int) -> T | None:
    """call()'s result, or None when the API server answers with one of `statuses` (404:
    already gone, 409: already there): what makes spanvm's calls idempotent."""
    try:
        return call()
    except ApiException as err:
        if err.status in statuses:
            return None
        raise


def api_error_text(err: ApiException) -> str:
    """The API server's own words for a refused request: status code and message."""
    message = err.reason or ""
    try:
        body = json.loads(err.body or "{}")
        message = str(body.get("message") or message)
    except (ValueError, AttributeError):
        pass
    return f"{err.status}: {message}"


def load_config(kubeconfig: str | None = None) -> client.ApiClient:
    """An API client from a kubeconfig file, else in-cluster config, else the default file."""
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
    else:
        try:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except config.ConfigException:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
    # As many kept-alive connections as the operator has API threads: a smaller pool throws
    # connections away under load and pays a TLS handshake for each request.
    configuration.connection_pool_maxsize = CONNECTIONS
    return client.ApiClient(configuration)


class Kube:
    """The calls spanvm makes, on one API client."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> "Kube":
        return cls(load_config(kubeconfig))

    # -- spanvm objects ----------------------------------------------------------------------
    def get_vm(self, namespace: str, name: str) -> JsonObject | None:
        return self._get_custom(namespace, SPANNINGVM_PLURAL, name)

    def get_fragment(self, namespace: str, name: str) -> JsonObject | None:
        return self._get_custom(namespace, VMFRAGMENT_PLURAL, name)

    def _get_custom(self, namespace: str, plural: str, name: str) -> JsonObject | None:
        obj = unless_status(
            lambda: self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name
            ),
            NOT_FOUND,
        )
        return cast(JsonObject | None, obj)

    def list_vms(self, namespace: str | None = None) -> list[JsonObject]:
        return self._list_custom(SPANNINGVM_PLURAL, namespace, None)

    def list_fragments(
        self, namespace: str | None = None, label_selector: str | None = None
    ) -> list[JsonObject]:
        return self._list_custom(VMFRAGMENT_PLURAL, namespace, label_selector)

    def _list_custom(
        self, plural: str, namespace: str | None, label_selector: str | None
    ) -> list[JsonObject]:
        kwargs: dict[str, Any] = {"label_selector": label_selector} if label_selector else {}
        if namespace is None:
            result = self.custom.list_cluster_custom_object(GROUP, VERSION, plural, **kwargs)
        else:
            result = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, **kwargs
            )
        items: list[JsonObject] = result["items"]  # type: ignore[index]
        return items

    def create_fragment(self, namespace: str, body: JsonObject) -> JsonObject | None:
        """Create a VMFragment: the object created, None if one of that name exists."""
        created = unless_status(
            lambda: self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, VMFRAGMENT_PLURAL, body
            ),
            CONFLICT,
        )
        return cast(JsonObject | None, created)

    def patch_fragment(self, namespace: str, name: str, patch: JsonObject) -> JsonObject | None:
        return self._patch_custom(namespace, VMFRAGMENT_PLURAL, name, patch, status=False)

    def patch_fragment_status(
        self, namespace: str, name: str, status: JsonObject
    ) -> JsonObject | None:
        return self._patch_custom(
            namespace, VMFRAGMENT_PLURAL, name, {"status": status}, status=True
        )

    def patch_vm_status(self, namespace: str, name: str, status: JsonObject) -> JsonObject | None:
        return self._patch_custom(
            namespace, SPANNINGVM_PLURAL, name, {"status": status}, status=True
        )

    def set_vm_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> JsonObject | None:
        """Replace a SpanningVM's finalizer list if the VM is still at `resource_version`:
        the VM after it, None if it is gone. A merge patch carrying metadata.resourceVersion
        is a precondition (ApiException 409 if the VM changed since; 422 if it is being
        deleted and the list adds a finalizer: the API server allows no new ones then)."""
        patch = {"metadata": {"resourceVersion": resource_version, "finalizers": finalizers}}
        return self._patch_custom(namespace, SPANNINGVM_PLURAL, name, patch, status=False)

    def _patch_custom(
        self, namespace: str, plural: str, name: str, patch: JsonObject, *, status: bool
    ) -> JsonObject | None:
        """Merge-patch an object (or its status): the object after it, None if it is gone."""
        call = (
            self.custom.patch_namespaced_custom_object_status
            if status
            else self.custom.patch_namespaced_custom_object
        )
        patched = unless_status(
            lambda: call(GROUP, VERSION, namespace, plural, name, patch), NOT_FOUND
        )
        return cast(JsonObject | None, patched)

    def delete_fragment(self, namespace: str, name: str) -> None:
        unless_status(
            lambda: self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, VMFRAGMENT_PLURAL, name
            ),
            NOT_FOUND,
        )

    def _plain(self, obj: object) -> Any:
        """A client model as the JSON the API server sent (camelCase keys)."""
        return self.api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]

    # -- core objects ------------------------------------------------------------------------
    def get_node(self, name: str) -> JsonObject | None:
        node = unless_status(lambda: self.core.read_node(name), NOT_FOUND)
        return None if node is None else self._plain(node)

    def patch_node_metadata(
        self, name: str, labels: dict[str, str], annotations: dict[str, str]
    ) -> None:
        self.core.patch_node(name, {"metadata": {"labels": labels, "annotations": annotations}})

    def get_lease(self, namespace: str, name: str) -> JsonObject | None:
        lease = unless_status(
            lambda: self.coordination.read_namespaced_lease(name, namespace), NOT_FOUND
        )
        return None if lease is None else self._plain(lease)

    def create_lease(self, namespace: str, body: JsonObject) -> bool:
        """Create a Lease; False if it exists already."""
        created = unless_status(
            lambda: self.coordination.create_namespaced_lease(namespace, cast(Any, body)),
            CONFLICT,
        )
        return created is not None

    def replace_lease(self, namespace: str, name: str, body: JsonObject) -> bool:
        """Replace a Lease at the resourceVersion in body; False if someone changed it first."""
        replaced = unless_status(
            lambda: self.coordination.replace_namespaced_lease(name, namespace, cast(Any, body)),
            CONFLICT,
            NOT_FOUND,
        )
        return replaced is not None

    def read_secret_key(self, namespace: str, name: str, key: str) -> bytes | None:
        secret = unless_status(lambda: self.core.read_namespaced_secret(name, namespace), NOT_FOUND)
        value = None if secret is None else (secret.data or {}).get(key)
        return None if value is None else base64.b64decode(value)

    def create_secret(self, namespace: str, body: JsonObject) -> bool:
        """Create a Secret; False if it exists already (its key is kept)."""
        created = unless_status(
            lambda: self.core.create_namespaced_secret(namespace, cast(Any, body)), CONFLICT
        )
        return created is not None

    # -- events ------------------------------------------------------------------------------
    def post_event(  # noqa: PLR0917 - the fields of an Event
        self,
        obj: JsonObject,
        type_: str,
        reason: str,
        message: str,
        component: str,
        instance: str,
    ) -> None:
        """A core/v1 Event about obj from `component` on `instance` (a node, a pod), as
        `kubectl describe` and `kubectl get events` show them."""
        meta = obj["metadata"]
        now = micro_time()
        body = {
            "metadata": {"generateName": f"{meta['name'][:200]}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component, "host": instance},
            "reportingComponent": component,
            "reportingInstance": instance,
            "action": reason,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "eventTime": now,
            "count": 1,
        }
        self.core.create_namespaced_event(meta["namespace"], cast(Any, body))
