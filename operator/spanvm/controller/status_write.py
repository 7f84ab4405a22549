"""The SpanningVM status the operator writes, built from the API model.

`next_status` is what a lifecycle `WriteStatus` makes of a VM's status: its keys merged in
(None removes one), its conditions set (lastTransitionTime kept unless the status flips),
observedGeneration and printableStatus, validated as a `SpanningVMStatus`, so a key the
model does not know or a value of the wrong shape fails here rather than at the API server.
`merge_patch` is the JSON merge patch (RFC 7386) from the status as stored to that one: only
what changed, None for what goes, nothing at all when nothing changes. Keys of status the
model does not describe are not the operator's: they are neither read nor touched. Pure.
"""

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from spanvm.api.phases import ConditionType
from spanvm.api.spanningvm import SpanningVMStatus
from spanvm.controller.printable import printable_status
from spanvm.controller.status import set_condition
from spanvm.kube import JsonObject

ConditionSpec = tuple[ConditionType, bool, str, str]  # type, status, reason, message
FIELDS = frozenset(f.alias or n for n, f in SpanningVMStatus.model_fields.items())


def own_status(vm: JsonObject) -> JsonObject:
    """The part of the VM's status the model describes (what the operator writes)."""
    return {k: v for k, v in (vm.get("status") or {}).items() if k in FIELDS}


def next_status(
    vm: JsonObject,
    changes: JsonObject,
    conditions: Sequence[ConditionSpec],
    now: datetime,
) -> SpanningVMStatus:
    """The VM's status once `changes` (camelCase keys, None removes) and `conditions` are
    written, for the VM's current metadata.generation."""
    status = own_status(vm)
    generation = int(vm["metadata"].get("generation") or 0)
    merged: JsonObject = {**status, **changes, "observedGeneration": generation}
    if conditions:
        conds = list(status.get("conditions") or [])
        for type_, ok, reason, message in conditions:
            conds = set_condition(conds, type_, ok, reason, message, generation, now)
        merged["conditions"] = conds
    merged = {k: v for k, v in merged.items() if v is not None}
    merged["printableStatus"] = printable_status(vm, merged)
    return SpanningVMStatus.model_validate({k: v for k, v in merged.items() if v is not None})


def merge_patch(old: JsonObject, new: JsonObject) -> JsonObject:
    """The JSON merge patch that turns `old` into `new` (objects merge key by key, lists
    and scalars are replaced); {} when they are equal."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            inner = merge_patch(before, value)
            if inner:
                patch[key] = inner
        elif value != before:
            patch[key] = value
    return patch
