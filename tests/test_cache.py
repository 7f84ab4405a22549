"""The watch cache's bookkeeping without an API server: newer versions win, and a late event
never brings a deleted object back."""

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
