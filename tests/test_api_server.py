"""The CRDs against the real kube-apiserver: established, explained, validated, printed."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from conftest import REPO, Cluster
from quantity_forms import MEMORY_FORMS
from spanvm.api.constants import GROUP, SPANNINGVM_PLURAL, VERSION
from spanvm.api.quantity import (
    ABOVE_MAXIMUM,
    BELOW_MINIMUM,
    MAX_GUEST_MEMORY_BYTES,
    MEMORY_ALIGNMENT,
    MIN_GUEST_MEMORY_BYTES,
    NOT_A_QUANTITY,
    NOT_ALIGNED,
    parse_memory,
)
from spanvm.api.spanningvm import SpanningVMSpec, heap_start
from spanvm.kube import Kube, api_error_text
from spanvm.payloads.build import resolve_image
from spanvm.payloads.catalog import MAX_IMAGE_SIZE, PAYLOAD_NAMES
from spanvm.vmm.layout import IMAGE_BASE, MAX_VCPUS, GuestLayout, LayoutError
from spanvm.vmm.memmap import ram_ranges

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))


def _expected_field(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert "expect:" in first, f"{path.name} must start with '# ... expect: <field path>'"
    return first.split("expect:", 1)[1].strip()


def test_control_plane_is_the_pinned_upstream(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.35.4"
    assert cluster.plane.ready()
    assert all(cluster.plane.running().values())


def test_crds_are_established(crds: Cluster) -> None:
    for name in ("spanningvms.spanvm.io", "vmfragments.spanvm.io"):
        crd = json.loads(crds.kubectl("get", "crd", name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert conditions["NamesAccepted"] == "True"


@pytest.mark.parametrize(
    ("field", "needle"),
    [
        ("svm.spec.placement", "Most fragments (nodes) the guest may be split into"),
        ("svm.spec.fabric.transport", "auto (TCP today; RDMA once the fabric has it)"),
        ("vmf.spec.homeMemory", "Guest-physical ranges this fragment is home for"),
        # defaults are stated (kubectl explain shows no schema default on its own)
        ("svm.spec.runStrategy", "Default: Once."),
        ("svm.spec.placement.minVcpusPerFragment", "Default: 1."),
        ("svm.spec.fabric.homePolicy", "Default: proportional."),
        # KubeVirt's run strategies with their meanings
        ("svm.spec.runStrategy", "RerunOnFailure: restarted after a failure"),
        ("svm.spec.runStrategy", "Manual: runs and stops only when asked"),
    ],
)
def test_kubectl_explain_shows_descriptions(crds: Cluster, field: str, needle: str) -> None:
    deadline = time.monotonic() + 30
    while True:  # discovery of a fresh CRD can lag a moment behind Established
        result = crds.kubectl("explain", field, check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert " ".join(result.stdout.split()).find(needle) >= 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_apply_and_reapply_is_a_noop(crds: Cluster, path: Path) -> None:
    ns = "examples-" + path.stem
    crds.kubectl("create", "namespace", ns)
    try:
        first = crds.kubectl("apply", "-n", ns, "-f", str(path)).stdout
        assert "created" in first
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        before = json.loads(crds.kubectl("get", "svm", name, "-n", ns, "-o", "json").stdout)
        second = crds.kubectl("apply", "-n", ns, "-f", str(path)).stdout
        assert "unchanged" in second
        after = json.loads(crds.kubectl("get", "svm", name, "-n", ns, "-o", "json").stdout)
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
        assert after["metadata"]["generation"] == 1
    finally:
        crds.kubectl("delete", "namespace", ns, "--wait=false")


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_manifests_are_rejected_naming_the_field(crds: Cluster, path: Path) -> None:
    field = _expected_field(path)
    result = crds.kubectl("apply", "-f", str(path), check=False)
    assert result.returncode != 0, f"{path.name} was accepted"
    assert field in result.stderr, result.stderr
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    missing = crds.kubectl("get", "svm", name, "--ignore-not-found", "-o", "name")
    assert missing.stdout.strip() == "", "a rejected object must not exist"


def test_immutable_fields_reject_updates(crds: Cluster) -> None:
    crds.kubectl("apply", "-f", str(REPO / "examples" / "spanningvm-single.yaml"))
    try:
        result = crds.kubectl(
            "patch",
            "svm",
            "hello-single",
            "--type=merge",
            "-p",
            '{"spec":{"cpu":{"vcpus":3}}}',
            check=False,
        )
        assert result.returncode != 0 and "spec.cpu is immutable" in result.stderr
        ok = crds.kubectl(
            "patch",
            "svm",
            "hello-single",
            "--type=merge",
            "-p",
            '{"spec":{"runStrategy":"Halted"}}',
        )
        assert "patched" in ok.stdout
    finally:
        crds.kubectl("delete", "svm", "hello-single")


def test_printer_columns_and_status_subresource(crds: Cluster) -> None:
    crds.kubectl("apply", "-f", str(REPO / "examples" / "spanningvm-2node.yaml"))
    try:
        header = crds.kubectl("get", "svm", "smp-sum-2node").stdout.splitlines()[0].split()
        assert header == [
            *["NAME", "STATUS", "READY", "VCPUS", "MEMORY", "FRAGMENTS", "NODES", "AGE"]
        ]
        wide = crds.kubectl("get", "svm", "smp-sum-2node", "-o", "wide").stdout.splitlines()
        assert wide[0].split()[8:] == ["PHASE", "STRATEGY", "RESTARTS", "EXIT", "MESSAGE"]
        # `kubectl get all` lists SpanningVMs, as it lists KubeVirt's VMs
        listed = crds.kubectl("get", "all", "-o", "name").stdout.split()
        assert "spanningvm.spanvm.io/smp-sum-2node" in listed
        # Status written through the main resource is dropped ...
        crds.kubectl(
            "patch", "svm", "smp-sum-2node", "--type=merge", "-p", '{"status":{"phase":"Running"}}'
        )
        obj = json.loads(crds.kubectl("get", "svm", "smp-sum-2node", "-o", "json").stdout)
        assert "status" not in obj or obj["status"].get("phase") is None
        # ... and accepted through the status subresource.
        crds.kubectl(
            "patch",
            "svm",
            "smp-sum-2node",
            "--subresource=status",
            "--type=merge",
            "-p",
            '{"status":{"phase":"Running","printableStatus":"Running","fragmentCount":2,'
            '"nodes":"node-a,node-b","restarts":3,"exitCode":0,"message":"the guest runs",'
            '"conditions":[{"type":"Ready","status":"True","reason":"GuestRunning"}]}}',
        )
        row = crds.kubectl("get", "svm", "smp-sum-2node", "--no-headers").stdout.split()
        assert row[1:7] == ["Running", "True", "2", "256Mi", "2", "node-a,node-b"]
        row = crds.kubectl("get", "svm", "smp-sum-2node", "--no-headers", "-o", "wide").stdout
        assert row.split()[8:] == ["Running", "Once", "3", "0", "the", "guest", "runs"]
        bad = crds.kubectl(
            "patch",
            "svm",
            "smp-sum-2node",
            "--subresource=status",
            "--type=merge",
            "-p",
            '{"status":{"phase":"Sleeping"}}',
            check=False,
        )
        assert bad.returncode != 0 and "status.phase" in bad.stderr
    finally:
        crds.kubectl("delete", "svm", "smp-sum-2node")


def test_garbage_collection_follows_owner_references(crds: Cluster) -> None:
    """kube-controller-manager runs: a VMFragment owned by a SpanningVM goes with it."""
    crds.kubectl("apply", "-f", str(REPO / "examples" / "spanningvm-single.yaml"))
    uid = crds.kubectl("get", "svm", "hello-single", "-o", "jsonpath={.metadata.uid}").stdout
    fragment = {
        "apiVersion": "spanvm.io/v1alpha1",
        "kind": "VMFragment",
        "metadata": {
            "name": "hello-single-0",
            "ownerReferences": [
                {
                    "apiVersion": "spanvm.io/v1alpha1",
                    "kind": "SpanningVM",
                    "name": "hello-single",
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "vmName": "hello-single",
            "index": 0,
            "fragmentCount": 1,
            "nodeName": "node-a",
            "vcpuIds": [0, 1],
            "vcpuCount": 2,
            "memory": "64Mi",
            "homeMemory": [{"start": 0, "size": 64 << 20}],
            "boot": {"payload": {"name": "hello"}},
        },
    }
    crds.kubectl("apply", "-f", "-", stdin=json.dumps(fragment))
    bad = dict(fragment, metadata={"name": "bad-fragment"})
    bad["spec"] = dict(fragment["spec"], vcpuIds=[0, 5])  # type: ignore[arg-type]
    rejected = crds.kubectl("apply", "-f", "-", stdin=json.dumps(bad), check=False)
    assert rejected.returncode != 0 and "spec.vcpuIds" in rejected.stderr
    crds.kubectl("delete", "svm", "hello-single")
    deadline = time.monotonic() + 60
    while crds.kubectl(
        "get", "vmf", "hello-single-0", "--ignore-not-found", "-o", "name"
    ).stdout.strip():
        assert time.monotonic() < deadline, "garbage collector did not delete the owned VMFragment"
        time.sleep(0.5)


def test_failed_start_reports_the_log_tail(tmp_path: Path) -> None:
    """A component that dies at start-up is named, with the end of its log, and nothing is
    left running."""
    from spanvm.devcluster.controlplane import ControlPlane, ControlPlaneError  # noqa: PLC0415

    plane = ControlPlane(tmp_path / "broken")
    (plane.state_dir).mkdir()
    (plane.state_dir / "etcd-data").write_text("not a directory")
    with pytest.raises(
        ControlPlaneError,
        match=r"(?s)etcd exited during start-up; log tail:\n.*failed to list data directory",
    ):
        plane.up(timeout=60)
    assert not any(plane.running().values()), "a failed start must not leave processes behind"


# -- issue 13: quantity forms and limits agree at admission, in the model and in the CLI ------


def _svm(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "spanvm.io/v1alpha1",
        "kind": "SpanningVM",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def _admit(kube: Kube, body: dict[str, Any]) -> str | None:
    """None if the API server would store the object (server-side dry run), else its refusal."""
    try:
        kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, "default", SPANNINGVM_PLURAL, body, dry_run="All"
        )
    except ApiException as err:
        return api_error_text(err)
    return None


def _model(spec: dict[str, Any]) -> str | None:
    try:
        SpanningVMSpec.model_validate(spec)
    except ValidationError as err:
        return str(err)
    return None


@pytest.fixture(scope="module")
def kube(crds: Cluster) -> Kube:
    return Kube.connect(str(crds.kubeconfig))


@pytest.mark.parametrize(("form", "reason"), MEMORY_FORMS, ids=[f for f, _ in MEMORY_FORMS])
def test_memory_forms_agree_across_api_server_model_and_cli(
    kube: Kube, form: str, reason: str | None
) -> None:
    spec = {"cpu": {"vcpus": 3}, "memory": form, "boot": {"payload": {"name": "hello"}}}
    refused = _admit(kube, _svm("quantity-form", spec))
    by_model = _model(spec)
    try:
        parse_memory(form)  # what `spanvm run --memory` and the agent use
        by_cli = None
    except ValueError as err:
        by_cli = str(err)
    if reason is None:
        assert refused is None and by_model is None and by_cli is None, (refused, by_model, by_cli)
        return
    for where, text in (("API server", refused), ("model", by_model), ("CLI", by_cli)):
        assert text is not None, f"{where} accepted {form!r}"
        assert reason in text, f"{where}: {text}"
        others = {NOT_A_QUANTITY, BELOW_MINIMUM, ABOVE_MAXIMUM, NOT_ALIGNED} - {reason}
        assert not any(o in text for o in others), f"{where} gave a wrong reason too: {text}"


def test_cli_refuses_memory_with_the_same_reason() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "operator")}
    for form, reason in (("66Gi", ABOVE_MAXIMUM), ("1Ei", ABOVE_MAXIMUM), ("100M", NOT_ALIGNED)):
        result = subprocess.run(
            [sys.executable, "-m", "spanvm.cli", "run", "--memory", form, "hello"],
            capture_output=True,
            text=True,
            check=False,
            env=env,
            timeout=60,
        )
        assert result.returncode == 2 and reason in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("spec", "field", "needle"),
    [
        ({"cpu": {"vcpus": 3}, "memory": "66Gi"}, "spec.memory", "at most 64Gi"),
        ({"cpu": {"vcpus": 3}, "memory": "100Gi"}, "spec.memory", "at most 64Gi"),
        ({"cpu": {"vcpus": MAX_VCPUS + 1}}, "spec.cpu.vcpus", f"less than or equal to {MAX_VCPUS}"),
        (
            {"boot": {"linux": {"kernel": "/boot/vmlinuz"}}},
            "spec.boot.linux",
            "boot.linux runs on one node until logical-destination IPIs cross fragments",
        ),
        (
            {"boot": {"linux": {"kernel": "/k"}}, "placement": {"maxFragments": 2}},
            "spec.boot.linux",
            "set placement.maxFragments: 1",
        ),
        ({"fabric": {"transport": "rdma"}}, "spec.fabric.transport", "rdma is not supported"),
        (
            {"memory": "16Mi", "cpu": {"vcpus": 128}, "boot": {"payload": {"name": "smp-sum"}}},
            "spec.memory",
            "payload smp-sum needs 8 bytes",
        ),
        (
            {"boot": {"payload": {"name": "smp-sum", "arg": 1 << 30}}},
            "spec.memory",
            "payload smp-sum needs 8 bytes",
        ),
        ({"boot": {"payload": {"name": "hello", "arg": 1 << 41}}}, "spec.boot.payload.arg", ""),
    ],
    ids=[
        "66Gi",
        "100Gi",
        "vcpus",
        "linux",
        "linux-2-fragments",
        "rdma",
        "smp-sum-memory",
        "smp-sum-arg",
        "arg",
    ],
)
def test_vmm_and_agent_limits_are_refused_at_admission(
    kube: Kube, spec: dict[str, Any], field: str, needle: str
) -> None:
    """What the VMM or the agent would refuse after placement is refused before it, naming
    the field, by the API server and the model alike (one source: vmm.layout, the catalog)."""
    base = {"cpu": {"vcpus": 2}, "memory": "256Mi", "boot": {"payload": {"name": "hello"}}}
    full = {**base, **spec}
    refused = _admit(kube, _svm("limits", full))
    assert refused is not None and field in refused and needle in refused, refused
    by_model = _model(full)
    assert by_model is not None and needle in by_model, by_model


def test_the_largest_accepted_vm_fits_the_vmm_layout() -> None:
    """Every spec the API accepts can be laid out by the VMM: the memory ceiling, the vCPU
    limit and the largest payload image together, and the smallest memory with most vCPUs."""
    top = IMAGE_BASE + MAX_IMAGE_SIZE
    GuestLayout.plan(MAX_GUEST_MEMORY_BYTES, MAX_VCPUS, top, ram_ranges(MAX_GUEST_MEMORY_BYTES))
    GuestLayout.plan(MIN_GUEST_MEMORY_BYTES, MAX_VCPUS, top, ram_ranges(MIN_GUEST_MEMORY_BYTES))
    assert heap_start(MAX_VCPUS) < MIN_GUEST_MEMORY_BYTES
    for name in PAYLOAD_NAMES:
        image = resolve_image(name)
        assert image.end - IMAGE_BASE <= MAX_IMAGE_SIZE, f"{name} outgrew MAX_IMAGE_SIZE"
    with pytest.raises(LayoutError, match="not supported"):
        GuestLayout.plan(
            MAX_GUEST_MEMORY_BYTES + MEMORY_ALIGNMENT,
            1,
            top,
            ram_ranges(MAX_GUEST_MEMORY_BYTES + MEMORY_ALIGNMENT),
        )
