"""The watch cache's bookkeeping without an API server: newer versions win, and a late event
never brings a deleted object back."""

import json
from collections.abc import Iterator

from kubernetes.client.exceptions import ApiException

from spanvm.controller.cache import Informer
from spanvm.kube import JsonObject


def obj(name: str, version: int, **extra: object) -> JsonObject:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": str(version)}, **extra}


def informer() -> Informer:
    return Informer("test", lambda *_a, **_k: None)


def test_a_newer_version_wins_an_older_one_is_ignored() -> None:
    cache = informer()
    cache.assume(obj("a", 5, status="five"))
    cache.assume(obj("a", 4, status="four"))
    assert cache.get("ns", "a") == obj("a", 5, status="five")
    cache.assume(obj("a", 6, status="six"))
    assert cache.get("ns", "a") == obj("a", 6, status="six")


def test_a_late_event_of_a_deleted_object_does_not_bring_it_back() -> None:
    cache = informer()
    cache.assume(obj("a", 5))
    cache.forget("ns", "a", deleted=obj("a", 7))
    cache.assume(obj("a", 6))  # an event from before the deletion, arriving after it
    assert cache.get("ns", "a") is None
    cache.assume(obj("a", 9))  # a new object of the same name
    assert cache.get("ns", "a") == obj("a", 9)


def test_forgetting_without_a_version_uses_the_one_held() -> None:
    cache = informer()
    cache.assume(obj("a", 5))
    cache.forget("ns", "a")
    cache.assume(obj("a", 5))
    assert cache.get("ns", "a") is None
    assert cache.items() == []


class WatchResponse:
    """A watch response as the client returns it with _preload_content=False."""

    def __init__(self, events: list[dict[str, object]]) -> None:
        self.lines = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        self.closed = False

    def stream(self, amt: object = None, decode_content: object = None) -> Iterator[bytes]:
        yield self.lines[:7]  # a line split across chunks
        yield self.lines[7:]

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        pass


def test_watch_events_are_applied_as_json_and_gone_ends_the_watch() -> None:
    """The watch is read as JSON lines (no client models): additions, changes and deletions
    reach the cache, a watch that ends is opened again from the last version seen (a
    bookmark's too), and 410 Gone ends it so the informer lists again."""
    asked: list[dict[str, object]] = []
    responses = [
        WatchResponse(
            [
                {"type": "ADDED", "object": obj("a", 5)},
                {"type": "MODIFIED", "object": obj("a", 6, status="six")},
                {"type": "ADDED", "object": obj("b", 7)},
                {"type": "DELETED", "object": obj("b", 8)},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}},
            ]
        ),
        WatchResponse([{"type": "ERROR", "object": {"code": 410, "message": "too old"}}]),
    ]

    def watch(**kwargs: object) -> WatchResponse:
        asked.append(kwargs)
        return responses[len(asked) - 1]

    cache = Informer("test", watch)
    cache._watch("4")  # returns: 410 Gone
    assert [a["resource_version"] for a in asked] == ["4", "9"]
    assert all(a["watch"] is True and a["_preload_content"] is False for a in asked)
    assert cache.get("ns", "a") == obj("a", 6, status="six")
    assert cache.get("ns", "b") is None
    assert all(r.closed for r in responses)


def test_a_watch_refused_as_gone_lists_again_quietly() -> None:
    def watch(**_kwargs: object) -> WatchResponse:
        raise ApiException(status=410, reason="Gone")

    Informer("test", watch)._watch("4")  # returns (the caller lists again), no error
