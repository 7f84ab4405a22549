"""SpanningVMs printed as kubectl prints objects: a table (`-o wide` adds columns, `-A` a
NAMESPACE column), `-o json`, `-o yaml` (a List when there are several) or `-o name`."""

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import yaml

from spanvm.kube import JsonObject
from spanvm.rfc3339 import parse_time

FORMATS = ("json", "yaml", "wide", "name")
RESOURCE = "spanningvm.spanvm.io"


def age(created: str | None, now: datetime | None = None) -> str:
    """kubectl's short age: 45s, 12m, 5h, 3d."""
    when = parse_time(created)
    if when is None:
        return "<unknown>"
    seconds = int(((now or datetime.now(UTC)) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _ready(status: JsonObject) -> str:
    found = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return str(found[0].get("status")) if found else ""


def _cell(value: object) -> str:
    return "" if value is None else str(value)


def row(vm: JsonObject, *, wide: bool, namespaced: bool) -> list[str]:
    """One VM's cells, in the CRD's printer-column order."""
    meta, spec, status = vm["metadata"], vm.get("spec") or {}, vm.get("status") or {}
    cells = [meta["namespace"]] if namespaced else []
    cells += [
        meta["name"],
        _cell(status.get("printableStatus") or status.get("phase")),
        _ready(status),
        _cell((spec.get("cpu") or {}).get("vcpus")),
        _cell(spec.get("memory")),
        _cell(status.get("fragmentCount")),
        _cell(status.get("nodes")),
        age(meta.get("creationTimestamp")),
    ]
    if wide:
        cells += [
            _cell(status.get("phase")),
            _cell(spec.get("runStrategy")),
            _cell(status.get("restarts")),
            _cell(status.get("exitCode")),
            _cell(status.get("message")),
        ]
    return cells


def table(vms: Sequence[JsonObject], *, wide: bool, namespaced: bool) -> str:
    """Aligned columns with a header, as `kubectl get svm`."""
    header = ["NAMESPACE"] if namespaced else []
    header += ["NAME", "STATUS", "READY", "VCPUS", "MEMORY", "FRAGMENTS", "NODES", "AGE"]
    if wide:
        header += ["PHASE", "STRATEGY", "RESTARTS", "EXIT", "MESSAGE"]
    rows = [header] + [row(vm, wide=wide, namespaced=namespaced) for vm in vms]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip()
        for r in rows
    )


def serialise(objects: Sequence[JsonObject], fmt: str, *, single: bool) -> str:
    """`-o json|yaml|name` text: the object itself when one was named, else a List."""
    if fmt == "name":
        return "\n".join(f"{RESOURCE}/{o['metadata']['name']}" for o in objects)
    data: JsonObject = (
        objects[0] if single else {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    )
    if fmt == "json":
        return json.dumps(data, indent=4)
    return yaml.safe_dump(data, sort_keys=False).rstrip("\n")
