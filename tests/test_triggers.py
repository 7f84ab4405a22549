"""Which SpanningVM watch events ask the operator for a pass (controller/handlers.Triggers):
the first sight of a VM and changes of what a user writes, never the echo of the operator's
own status writes."""

import copy
from typing import Any

from spanvm.api.constants import FINALIZER
from spanvm.controller.handlers import NoDiffBase, Triggers, guarded


def vm(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "vm",
            "namespace": "ns",
            "uid": "u1",
            "generation": 1,
            "finalizers": [FINALIZER],
        },
        "spec": {"runStrategy": "Once"},
        "status": status,
    }


def test_first_sight_and_user_changes_ask_for_a_pass_status_echoes_do_not() -> None:
    triggers = Triggers()
    obj = vm()
    assert triggers.wants_pass(obj)  # created, or there when the operator starts
    assert not triggers.wants_pass(vm(phase="Scheduling"))  # the operator's own write
    changed = copy.deepcopy(obj)
    changed["metadata"]["generation"] = 2  # spec.runStrategy changed
    assert triggers.wants_pass(changed)
    changed["metadata"]["annotations"] = {"spanvm.io/request": "restart/1"}
    assert triggers.wants_pass(changed)
    changed["metadata"]["labels"] = {"team": "a"}
    assert triggers.wants_pass(changed)
    assert not triggers.wants_pass(copy.deepcopy(changed))


def test_a_failed_pass_or_a_recreated_vm_asks_again() -> None:
    triggers = Triggers()
    obj = vm()
    assert triggers.wants_pass(obj)
    triggers.forget(obj)  # the pass raised
    assert triggers.wants_pass(vm(phase="Pending"))
    recreated = vm()
    recreated["metadata"]["uid"] = "u2"
    assert triggers.wants_pass(recreated)


def test_kopf_keeps_no_diff_base_so_writes_none() -> None:
    storage = NoDiffBase()
    patch: dict[str, Any] = {}
    storage.store(body=vm(), patch=patch, essence={"spec": {}})  # type: ignore[arg-type]
    assert patch == {} and storage.fetch(body=vm()) is None  # type: ignore[arg-type]


def test_guarded_means_the_operators_finalizer_is_on() -> None:
    fresh = vm()
    del fresh["metadata"]["finalizers"]
    assert not guarded(fresh)
    assert guarded(vm())
