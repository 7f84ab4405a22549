"""Generates the CustomResourceDefinitions in crds/ from the pydantic models.

The models are the one source of truth: `make crds` rewrites crds/*.yaml and a test fails when
the committed files differ from what this module generates. Pydantic's JSON Schema is turned
into a Kubernetes structural schema: references inlined, optional unions collapsed, titles
dropped, and every property required to carry a description (for `kubectl explain`).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from spanvm.api.constants import GROUP, SPANNINGVM_PLURAL, VERSION, VMFRAGMENT_PLURAL
from spanvm.api.spanningvm import SpanningVMSpec, SpanningVMStatus
from spanvm.api.vmfragment import VMFragmentSpec, VMFragmentStatus

_DROP = {"title", "examples"}


class SchemaError(ValueError):
    """A model cannot be expressed as a structural schema."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a `$ref` (keeping sibling keys such as description) and unwrap single allOf."""
    node = dict(node)
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node.pop("allOf")[0], **node}
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        target = dict(defs[name])
        # The field's own description beats the model's docstring.
        node = {**target, **node}
    return node


def structural(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node into a structural OpenAPI v3 node."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise SchemaError(f"{path}: unions other than `X | None` cannot be structural")
        node = {**_resolve(branches[0], defs), **node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out["properties"] = {}
            for name, prop in value.items():
                converted = structural(prop, defs, f"{path}.{name}")
                if not converted.get("description"):
                    raise SchemaError(f"{path}.{name}: every field needs a description")
                out["properties"][name] = converted
        elif key == "items":
            out["items"] = structural(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out["additionalProperties"] = structural(value, defs, f"{path}{{}}")
            # `false` is implied by pruning and is not allowed beside properties.
        else:
            out[key] = value
    if out.get("default") is not None and "description" in out:
        out["description"] = with_default(str(out["description"]), out["default"])
    if "enum" in out and "type" not in out:
        types = {type(v) for v in out["enum"]}
        out["type"] = "integer" if types == {int} else "string"
    if "type" not in out:
        raise SchemaError(f"{path}: no type")
    return out


def with_default(description: str, default: Any) -> str:
    """The description ending with the field's default, which `kubectl explain` shows only
    through the description."""
    shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip()
    shown = shown.removesuffix("...").strip()
    return f"{description.rstrip()} Default: {shown}."


def model_schema(model: type[BaseModel], path: str) -> dict[str, Any]:
    """The structural schema of one model (camelCase property names)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return structural(raw, defs, path)


@dataclass(frozen=True)
class CrdSpec:
    """What distinguishes one of our CRDs from another."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    description: str
    printer_columns: tuple[dict[str, Any], ...]


def _column(
    name: str, type_: str, path: str, description: str, priority: int = 0
) -> dict[str, Any]:
    col: dict[str, Any] = {
        "name": name,
        "type": type_,
        "jsonPath": path,
        "description": description,
    }
    if priority:
        col["priority"] = priority
    return col


_AGE = _column("Age", "date", ".metadata.creationTimestamp", "Time since creation.")
_WIDE = 1  # columns shown by `kubectl get -o wide` only

CRDS: tuple[CrdSpec, ...] = (
    CrdSpec(
        kind="SpanningVM",
        plural=SPANNINGVM_PLURAL,
        short_names=("svm",),
        spec_model=SpanningVMSpec,
        status_model=SpanningVMStatus,
        description=(
            "A KVM virtual machine whose vCPUs and memory span several nodes: spanvm splits it "
            "into VMFragments, one per node, kept coherent by a memory fabric."
        ),
        printer_columns=(
            _column("Status", "string", ".status.printableStatus", "The state, for people."),
            _column(
                "Ready",
                "string",
                '.status.conditions[?(@.type=="Ready")].status',
                "Whether the guest runs with every fragment connected.",
            ),
            _column("vCPUs", "integer", ".spec.cpu.vcpus", "Virtual CPUs of the guest."),
            _column("Memory", "string", ".spec.memory", "Guest memory."),
            _column("Fragments", "integer", ".status.fragmentCount", "Fragments placed."),
            _column("Nodes", "string", ".status.nodes", "Nodes running fragments."),
            _AGE,
            _column("Phase", "string", ".status.phase", "Lifecycle phase.", _WIDE),
            _column("Strategy", "string", ".spec.runStrategy", "The run strategy.", _WIDE),
            _column("Restarts", "integer", ".status.restarts", "Restarts of the guest.", _WIDE),
            _column("Exit", "integer", ".status.exitCode", "The guest's exit code.", _WIDE),
            _column("Message", "string", ".status.message", "Why it is in its state.", _WIDE),
        ),
    ),
    CrdSpec(
        kind="VMFragment",
        plural=VMFRAGMENT_PLURAL,
        short_names=("vmf",),
        spec_model=VMFragmentSpec,
        status_model=VMFragmentStatus,
        description=(
            "One placed fragment of a SpanningVM: the vCPUs and home memory that one node's "
            "agent runs. Written by the operator, run and reported by the node agent."
        ),
        printer_columns=(
            _column("VM", "string", ".spec.vmName", "The SpanningVM this fragment belongs to."),
            _column("Index", "integer", ".spec.index", "Fragment number within the VM."),
            _column("Node", "string", ".spec.nodeName", "Node running the fragment."),
            _column("vCPUs", "string", ".spec.vcpuIds", "Guest vCPU ids run here."),
            _column("Phase", "string", ".status.phase", "Lifecycle phase."),
            _column("Endpoint", "string", ".status.endpoint", "Fabric listener.", _WIDE),
            _column("Exit", "integer", ".status.exitCode", "Exit code.", _WIDE),
            _column("Message", "string", ".status.message", "Why it is in its phase.", _WIDE),
            _AGE,
        ),
    ),
)


def build_crd(crd: CrdSpec) -> dict[str, Any]:
    """The full CustomResourceDefinition object for one kind."""
    schema = {
        "type": "object",
        "description": crd.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": model_schema(crd.spec_model, "spec"),
            "status": model_schema(crd.status_model, "status"),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{crd.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": crd.kind,
                "listKind": f"{crd.kind}List",
                "plural": crd.plural,
                "singular": crd.kind.lower(),
                "shortNames": list(crd.short_names),
                # `kubectl get all` lists them too, as it lists KubeVirt's VMs and VMIs
                "categories": ["spanvm", "all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(crd.printer_columns),
                }
            ],
        },
    }


HEADER = (
    "# Generated by `make crds` from operator/spanvm/api (python -m spanvm.api.crd). Do not edit.\n"
)


def render(crd: CrdSpec) -> str:
    """The YAML text of one CRD file, as committed in crds/."""
    return HEADER + yaml.safe_dump(build_crd(crd), sort_keys=False, width=100)


def crd_filename(crd: CrdSpec) -> str:
    """File name of one CRD inside crds/."""
    return f"{GROUP}_{crd.plural}.yaml"


def main(argv: list[str] | None = None) -> int:
    """`python -m spanvm.api.crd [--check] DIR...`: write (or check) the CRD files (the
    repository's crds/ and the Helm chart's copy)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path, nargs="+")
    parser.add_argument("--check", action="store_true", help="fail if the files are out of date")
    args = parser.parse_args(argv)
    stale = []
    for directory in args.directory:
        for crd in CRDS:
            target = directory / crd_filename(crd)
            text = render(crd)
            if args.check:
                if not target.exists() or target.read_text() != text:
                    stale.append(str(target))
            else:
                directory.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
    if stale:
        print("out of date (run `make crds`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
