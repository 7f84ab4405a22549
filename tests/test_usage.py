"""What placed fragments take on each node (controller/usage.py): the rules, and the memo
that must give the rule's answer however the objects change between decisions."""

import copy
import random
from typing import Any

from spanvm.controller.usage import UsageMemo, usage_by_node
from spanvm.scheduler.snapshot import Usage

GiB = 1 << 30


def vm(i: int, phase: str = "Starting", nodes: tuple[str, ...] = ("a", "b")) -> dict[str, Any]:
    entries = [
        {"name": f"vm{i}-{k}", "nodeName": n, "vcpuIds": [2 * k, 2 * k + 1], "memory": "1Gi"}
        for k, n in enumerate(nodes)
    ]
    return {
        "metadata": {"name": f"vm{i}", "namespace": "ns", "uid": f"u{i}"},
        "status": {"phase": phase, "fragments": entries},
    }


def fragment(vm_obj: dict[str, Any], k: int, phase: str | None = None) -> dict[str, Any]:
    entry = vm_obj["status"]["fragments"][k]
    return {
        "metadata": {
            "name": entry["name"],
            "namespace": "ns",
            "ownerReferences": [{"uid": vm_obj["metadata"]["uid"]}],
        },
        "spec": {
            "nodeName": entry["nodeName"],
            "vmName": vm_obj["metadata"]["name"],
            "vcpuIds": entry["vcpuIds"],
            "homeMemory": [{"start": 0, "size": GiB}],
        },
        "status": {"phase": phase} if phase else {},
    }


def test_the_rules() -> None:
    placed, done, gone_vm = vm(1), vm(2), vm(3)
    finished = vm(4, phase="Succeeded", nodes=("c",))
    frags = [
        fragment(placed, 0, "Running"),  # fragment 1 not created yet: its share still counts
        fragment(done, 0, "Succeeded"),  # done: frees its node
        fragment(done, 1, "Running"),
        fragment(gone_vm, 0, "Running"),  # its VM is gone: the fragment counts itself
        fragment(finished, 0, "Running"),  # a finished VM holds nothing
    ]
    usage = usage_by_node(frags, [placed, done, finished])
    assert usage == {"a": Usage(4, 2 * GiB), "b": Usage(4, 2 * GiB)}
    assert usage_by_node(frags, [placed, done, finished], ("ns", "vm1")) == {
        "a": Usage(2, 1 * GiB),
        "b": Usage(2, 1 * GiB),
    }


def test_the_memo_answers_as_the_rule_whatever_changes_between_decisions() -> None:
    rnd = random.Random(16)
    vms = [vm(i, nodes=tuple(rnd.sample("abcdef", rnd.randint(1, 3)))) for i in range(12)]
    frags = [fragment(v, k) for v in vms for k in range(len(v["status"]["fragments"]))]
    memo = UsageMemo()
    for _ in range(300):
        what = rnd.randrange(5)
        if what == 0 and frags:  # a fragment reports a new phase (the cache holds a new object)
            i = rnd.randrange(len(frags))
            frags[i] = copy.deepcopy(frags[i])
            frags[i]["status"] = {"phase": rnd.choice(["Running", "Succeeded", "Failed", None])}
        elif what == 1:  # the operator writes a VM's status (replaced, not edited)
            v = rnd.choice(vms)
            v["status"] = {**v["status"], "phase": rnd.choice(["Starting", "Running", "Failed"])}
        elif what == 2 and frags:  # a fragment is deleted
            frags.pop(rnd.randrange(len(frags)))
        elif what == 3:  # a VM is restarted: no placement until the next one is written
            i = rnd.randrange(len(vms))
            vms[i] = {**vms[i], "status": {"phase": "Pending"}}
        else:  # a new version of a VM object from the watch, same content
            i = rnd.randrange(len(vms))
            vms[i] = copy.deepcopy(vms[i])
        exclude = rnd.choice([None, ("ns", f"vm{rnd.randrange(12)}")])
        assert memo.usage(frags, vms, exclude) == usage_by_node(frags, vms, exclude)


def test_a_fragment_that_changed_while_its_vm_was_left_out_is_seen() -> None:
    vm1, vm2 = vm(1), vm(2, nodes=("c",))
    frags = [fragment(vm1, 0, "Running"), fragment(vm1, 1, "Running"), fragment(vm2, 0)]
    memo = UsageMemo()
    memo.usage(frags, [vm1, vm2])
    frags[0] = {**frags[0], "status": {"phase": "Succeeded"}}  # a new object in the cache
    memo.usage(frags, [vm1, vm2], ("ns", "vm1"))  # placing vm1 again: it is left out
    assert memo.usage(frags, [vm1, vm2]) == usage_by_node(frags, [vm1, vm2])
    assert "a" not in memo.usage(frags, [vm1, vm2])
