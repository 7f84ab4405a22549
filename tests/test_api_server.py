"""The CRDs against the real kube-apiserver: established, explained, validated, printed."""

import json
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, Cluster

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
        ("svm.spec.fabric.transport", "auto (RDMA where every node has it, else TCP)"),
        ("vmf.spec.homeMemory", "Guest-physical ranges this fragment is home for"),
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
        assert header == ["NAME", "PHASE", "VCPUS", "MEMORY", "FRAGMENTS", "NODES", "AGE"]
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
            '{"status":{"phase":"Running","fragmentCount":2,"nodes":"node-a,node-b"}}',
        )
        row = crds.kubectl("get", "svm", "smp-sum-2node", "--no-headers").stdout.split()
        assert row[1:6] == ["Running", "2", "256Mi", "2", "node-a,node-b"]
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
