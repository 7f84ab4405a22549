"""The API models and the CRDs generated from them (no cluster needed)."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError

from spanvm.api.constants import (
    agent_lease_name,
    fabric_secret_name,
    fragment_name,
    label_value,
)
from spanvm.api.crd import CRDS, SchemaError, crd_filename, model_schema, render
from spanvm.api.quantity import format_memory, parse_memory
from spanvm.api.spanningvm import SpanningVM, SpanningVMSpec
from spanvm.controller.cluster_view import HeartbeatObserver
from spanvm.devcluster.paths import repo_root

REPO = repo_root()
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_MAX = 63


@pytest.mark.parametrize("crd", CRDS, ids=lambda c: c.kind)
def test_committed_crds_match_the_models(crd) -> None:  # type: ignore[no-untyped-def]
    for directory in ("crds", "charts/spanvm/files/crds"):
        committed = (REPO / directory / crd_filename(crd)).read_text()
        assert committed == render(crd), f"{directory}/ is stale: run `make crds`"


def _walk(schema: dict, path: str = "") -> list[str]:  # type: ignore[type-arg]
    missing = []
    for name, prop in schema.get("properties", {}).items():
        if not prop.get("description"):
            missing.append(f"{path}.{name}")
        missing += _walk(prop, f"{path}.{name}")
    if "items" in schema:
        missing += _walk(schema["items"], f"{path}[]")
    return missing


@pytest.mark.parametrize("crd", CRDS, ids=lambda c: c.kind)
def test_every_schema_field_has_a_description(crd) -> None:  # type: ignore[no-untyped-def]
    spec = model_schema(crd.spec_model, "spec")
    status = model_schema(crd.status_model, "status")
    assert _walk(spec) == [] and _walk(status) == []


def test_generator_refuses_a_field_without_description() -> None:
    class Bad(BaseModel):
        documented: int = Field(description="fine")
        undocumented: int

    with pytest.raises(SchemaError, match="undocumented"):
        model_schema(Bad, "spec")


def test_schemas_are_structural() -> None:
    """No $ref, anyOf or untyped node survives: the API server would refuse them."""
    for crd in CRDS:
        text = render(crd)
        assert "$ref" not in text and "anyOf" not in text and "title:" not in text
        doc = yaml.safe_load(text)
        schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        stack = [schema]
        while stack:
            node = stack.pop()
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields")
            stack += list(node.get("properties", {}).values())
            stack += [node["items"]] if "items" in node else []


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse_as_models(path: Path) -> None:
    vm = SpanningVM.model_validate(yaml.safe_load(path.read_text()))
    assert vm.spec.cpu.vcpus >= 1


def test_model_round_trips_camel_case() -> None:
    spec = SpanningVMSpec.model_validate(
        {
            "cpu": {"vcpus": 4},
            "memory": "1Gi",
            "boot": {"payload": {"name": "smp-sum"}},
            "placement": {"maxFragments": 2},
            "runStrategy": "Always",
        }
    )
    assert spec.placement is not None and spec.placement.max_fragments == 2
    assert spec.to_api()["placement"] == {"maxFragments": 2, "minVcpusPerFragment": 1}


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"memory": "lots"}, "memory\n  String should match pattern"),
        ({"memory": "100M"}, "multiple of 2Mi"),
        ({"boot": {"payload": {"name": "doom"}}}, "unknown payload"),
        ({"cpu": {"vcpus": 0}}, "greater than or equal to 1"),
        ({"fabric": {"transport": "infiniband"}}, "transport"),
    ],
)
def test_models_reject_bad_input(spec: dict, needle: str) -> None:  # type: ignore[type-arg]
    base = {"cpu": {"vcpus": 2}, "memory": "64Mi", "boot": {"payload": {"name": "hello"}}}
    with pytest.raises(ValidationError, match=needle):
        SpanningVMSpec.model_validate({**base, **spec})


@pytest.mark.parametrize(
    ("text", "size"), [("16Mi", 16 << 20), ("2Gi", 2 << 30), ("33554432", 32 << 20)]
)
def test_parse_memory(text: str, size: int) -> None:
    assert parse_memory(text) == size
    assert parse_memory(format_memory(size)) == size


@pytest.mark.parametrize("text", ["", "lots", "1Mi", "100M", "0.5Gi5", "1.5m"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_memory(text)


@pytest.mark.parametrize(
    "path", sorted((REPO / "examples" / "invalid").glob("*.yaml")), ids=lambda p: p.name
)
def test_invalid_examples_are_refused_by_the_model_too(path: Path) -> None:
    """The model and the CRD refuse the same manifests (the API server side is in
    test_api_server.py)."""
    with pytest.raises(ValidationError):
        SpanningVM.model_validate(yaml.safe_load(path.read_text()))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a loaded machine
@given(
    st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", fullmatch=True).filter(
        lambda n: bool(DNS_SUBDOMAIN.match(n))
    ),
    st.integers(0, 63),
)
def test_derived_names_are_valid_for_any_legal_name(name: str, index: int) -> None:
    """Label values, child names and Lease names derived from any legal object name (up to
    253 characters) are valid, and distinct names give distinct results."""
    for value in (label_value(name), label_value(name + "x")):
        assert len(value) <= LABEL_MAX and LABEL_VALUE.match(value), value
    assert label_value(name) != label_value(name + "x")
    for child in (
        fragment_name(name, index),
        fabric_secret_name(name, "0b5e1f3c-5d2e-4c55-9f3a-2b7c1d0e9a11"),
        agent_lease_name(name),
    ):
        assert len(child) <= 253 and DNS_SUBDOMAIN.match(child), child
    assert fragment_name(name, index) != fragment_name(name + "x", index)


def test_heartbeats_are_judged_by_the_observers_clock() -> None:
    """A renewal is a renewTime seen to change; the remote timestamp is never compared with
    the local clock (skewed agents, either way)."""
    now = [1000.0]
    observer = HeartbeatObserver(clock=lambda: now[0])

    def lease(node: str, renew: str) -> dict[str, Any]:
        return {
            "metadata": {"name": agent_lease_name(node)},
            "spec": {"holderIdentity": node, "renewTime": renew, "leaseDurationSeconds": 6},
        }

    behind = [f"2000-01-01T00:00:0{i}.000000Z" for i in range(10)]  # a clock years behind
    ahead = "2100-01-01T00:00:00.000000Z"  # a clock far ahead, then the agent dies
    for i in range(10):
        seen = observer.observe([lease("behind", behind[i]), lease("ahead", ahead)])
        assert seen["behind"], i
        assert seen["ahead"] == (now[0] - 1000.0 < 6), i
        now[0] += 1.0
    assert observer.observe([lease("ahead", ahead)]) == {"ahead": False}
