"""Watch caches (the informer pattern): the operator reads Nodes, agent Leases, VMFragments
and SpanningVMs from memory instead of listing them on every pass.

Each `Informer` lists once, then watches from that resourceVersion in a thread, relisting when
the watch expires (410 Gone) or fails. What the operator writes or receives from Kopf is put
in at once (`assume`, kept only if newer than what is held), so a pass never acts on an
object older than one it has already seen: the placement written for one VM counts against
the next VM's before the watch echoes it.
"""

import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from spanvm.api.constants import GROUP, SPANNINGVM_PLURAL, VERSION, VMFRAGMENT_PLURAL
from spanvm.kube import JsonObject, Kube

log = logging.getLogger("spanvm.operator")
GONE = 410


def _key(obj: JsonObject) -> tuple[str, str]:
    meta = obj["metadata"]
    return (str(meta.get("namespace") or ""), str(meta["name"]))


def in_namespaces(objs: Iterable[JsonObject], namespaces: Iterable[str]) -> list[JsonObject]:
    """The objects in `namespaces` (all of them when it is empty: the operator handles every
    namespace), as Kopf is told to handle them."""
    wanted = frozenset(namespaces)
    objs = list(objs)
    return objs if not wanted else [o for o in objs if o["metadata"].get("namespace") in wanted]


def _version(obj: JsonObject | None) -> int | None:
    try:
        return int((obj or {}).get("metadata", {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return None  # none, or opaque


def _newer(new: JsonObject, old: JsonObject | None) -> bool:
    a, b = _version(new), _version(old)
    return old is None or a is None or b is None or a >= b  # opaque: the later arrival wins


class Informer:
    """A list+watch cache of one kind of object."""

    def __init__(self, what: str, list_call: Callable[..., Any], *args: Any) -> None:
        self.what, self._list, self._args = what, list_call, args
        self._store: dict[tuple[str, str], JsonObject] = {}
        self.changes = 0  # bumped on every change: callers memoise what they derive
        self._gone: dict[tuple[str, str], int] = {}  # deleted objects: their last version
        self._lock = threading.Lock()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{what}", daemon=True)

    def start(self) -> "Informer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def items(self) -> list[JsonObject]:
        with self._lock:
            return list(self._store.values())

    def get(self, namespace: str, name: str) -> JsonObject | None:
        with self._lock:
            return self._store.get((namespace, name))

    def assume(self, obj: JsonObject) -> None:
        """An object this process wrote or was handed: held if newer than the cached one,
        and never if it is a version of one already deleted (a late event must not bring a
        deleted object back)."""
        with self._lock:
            key = _key(obj)
            gone, version = self._gone.get(key), _version(obj)
            if gone is not None and version is not None and version <= gone:
                return
            if _newer(obj, self._store.get(key)):
                self._store[key] = obj
                self.changes += 1

    def forget(self, namespace: str, name: str, deleted: JsonObject | None = None) -> None:
        """The object is gone: drop it and remember up to which version it was."""
        with self._lock:
            old = self._store.pop((namespace, name), None)
            version = _version(deleted) or _version(old)
            if version is not None:
                self._gone[(namespace, name)] = max(version, self._gone.get((namespace, name), 0))
            self.changes += 1

    def _relist(self) -> str:
        response = self._list(*self._args, _preload_content=False)
        # urllib3's response (older clients) has the body in .data; RESTResponse needs read()
        body = json.loads(response.data if response.data is not None else response.read())
        with self._lock:
            self._store = {_key(o): o for o in body.get("items") or []}
            self.changes += 1
        self.synced.set()
        return str(body["metadata"]["resourceVersion"])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._relist()
                self._watch(version)
            except Exception as err:
                log.warning("watching %s failed (%s); listing again", self.what, err)
                self._stop.wait(1.0)

    def _open_watch(self, version: str) -> Any:
        return self._list(
            *self._args,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=300,
            _preload_content=False,
            # a connection silent for 330 s (bookmarks come about every minute) ends the watch
            _request_timeout=(10, 330),
        )

    def _watch(self, version: str) -> None:
        """Follow the watch from `version` until it ends with 410 Gone (return: list again)
        or the informer stops. Events are parsed as JSON only: the client's `Watch` would
        turn each into its model (a V1Lease for every heartbeat) and back."""
        while not self._stop.is_set():
            try:
                response = self._open_watch(version)
            except ApiException as err:
                if err.status == GONE:
                    return  # the version is too old already: list again
                raise
            try:
                for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                    if not line:
                        continue
                    event = json.loads(line)
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        if obj.get("code") == GONE:
                            return  # expired: list again
                        raise RuntimeError(obj.get("message"))
                    version = obj["metadata"]["resourceVersion"]
                    if kind == "DELETED":
                        self.forget(*_key(obj), deleted=obj)
                    elif kind in ("ADDED", "MODIFIED"):
                        self.assume(obj)
                    if self._stop.is_set():
                        return
            finally:
                response.close()
                response.release_conn()


class ClusterCache:
    """The four informers the operator reads through."""

    def __init__(self, kube: Kube, system_namespace: str) -> None:
        custom = kube.custom.list_cluster_custom_object
        self.vms = Informer("spanningvms", custom, GROUP, VERSION, SPANNINGVM_PLURAL)
        self.fragments = Informer("vmfragments", custom, GROUP, VERSION, VMFRAGMENT_PLURAL)
        self.nodes = Informer("nodes", kube.core.list_node)
        self.leases = Informer("leases", kube.coordination.list_namespaced_lease, system_namespace)

    def all(self) -> Iterable[Informer]:
        return (self.vms, self.fragments, self.nodes, self.leases)

    def start(self, timeout: float = 60.0) -> None:
        """Start watching; returns once every cache has listed (or raises)."""
        for informer in self.all():
            informer.start()
        for informer in self.all():
            if not informer.synced.wait(timeout):
                raise TimeoutError(f"the {informer.what} cache did not sync in {timeout:.0f}s")

    def stop(self) -> None:
        for informer in self.all():
            informer.stop()
