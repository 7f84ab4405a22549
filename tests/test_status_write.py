"""The SpanningVM status as the operator writes it: built from the API model, sent as the
merge patch of what changed."""

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from spanvm.api.phases import ConditionType, Reason, VMPhase
from spanvm.controller.status_write import ConditionSpec, merge_patch, next_status, own_status

NOW = datetime(2026, 11, 29, 20, 0, 0, tzinfo=UTC)
PLACED = [{"name": "vm-0", "nodeName": "n1", "vcpuIds": [0, 1], "memory": "1Gi"}]


def vm(status: dict[str, Any] | None = None, generation: int = 3) -> dict[str, Any]:
    return {
        "metadata": {"name": "vm", "namespace": "ns", "generation": generation},
        "spec": {"cpu": {"vcpus": 2}, "memory": "1Gi", "runStrategy": "Once"},
        "status": status or {},
    }


def write(
    obj: dict[str, Any],
    changes: dict[str, Any],
    conditions: Sequence[ConditionSpec] = (),
    now: datetime = NOW,
) -> dict[str, Any]:
    """The merge patch the operator sends for these changes."""
    new = next_status(obj, changes, conditions, now).to_api()
    return merge_patch(own_status(obj), new)


def test_a_placement_is_written_camel_case_with_generation_and_printable_status() -> None:
    cond = (ConditionType.SCHEDULED, True, Reason.PLACED, "placed on n1")
    patch = write(
        vm(), {"phase": VMPhase.SCHEDULING, "fragments": PLACED, "fragmentCount": 1}, [cond]
    )
    assert patch == {
        "phase": "Scheduling",
        "printableStatus": "Provisioning",
        "observedGeneration": 3,
        "fragments": PLACED,
        "fragmentCount": 1,
        "conditions": [
            {
                "type": "Scheduled",
                "status": "True",
                "reason": "Placed",
                "message": "placed on n1",
                "lastTransitionTime": "2026-11-29T20:00:00Z",
                "observedGeneration": 3,
            }
        ],
    }


def test_nothing_changed_is_no_write_and_the_transition_time_stays() -> None:
    cond = (ConditionType.READY, False, Reason.WAITING_FOR_FRAGMENTS, "waiting")
    first = next_status(vm(), {"phase": VMPhase.STARTING}, [cond], NOW).to_api()
    later = NOW + timedelta(minutes=5)
    assert write(vm(first), {"phase": VMPhase.STARTING}, [cond], later) == {}
    # the message changes, the status does not: lastTransitionTime is kept
    patch = write(vm(first), {}, [(*cond[:3], "still waiting")], later)
    assert patch["conditions"][0]["lastTransitionTime"] == "2026-11-29T20:00:00Z"
    assert set(patch) == {"conditions"}


def test_none_removes_a_key_and_a_nested_one() -> None:
    current = next_status(
        vm(),
        {
            "phase": VMPhase.FAILED,
            "exitCode": 3,
            "startFailure": {
                "consecutiveFailCount": 2,
                "retryAfterTimestamp": "2026-11-29T20:01:00Z",
            },
        },
        [],
        NOW,
    ).to_api()
    patch = write(
        vm(current),
        {
            "phase": VMPhase.PENDING,
            "exitCode": None,
            "startFailure": {"consecutiveFailCount": 2, "retryAfterTimestamp": None},
        },
    )
    # a merge patch merges objects: the timestamp must be removed by name
    assert patch["exitCode"] is None
    assert patch["startFailure"] == {"retryAfterTimestamp": None}
    assert patch["phase"] == "Pending" and patch["printableStatus"] == "Provisioning"


def test_keys_the_model_does_not_know_are_refused_in_changes_and_left_alone_in_status() -> None:
    with pytest.raises(ValidationError):
        next_status(vm(), {"fragmentsCount": 1}, [], NOW)
    with pytest.raises(ValidationError):
        next_status(vm(), {"restarts": "twice"}, [], NOW)
    # someone else's key in status is neither read nor removed
    assert "kopf" not in write(vm({"kopf": {"progress": {}}, "phase": "Pending"}), {})


def test_a_new_generation_is_observed() -> None:
    current = next_status(vm(), {"phase": VMPhase.PENDING}, [], NOW).to_api()
    assert write(vm(current, generation=4), {}) == {"observedGeneration": 4}
