"""The Helm chart: lint, render, server-side dry-run against the real API server, the agent's
least-privilege RBAC and admission policy enforced for real, the Argo CD health check in Lua,
and the Dockerfile linted and consistent with the chart."""

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, Cluster
from k8s_sim import ensure_namespace
from spanvm.api.constants import agent_lease_name
from spanvm.devcluster.paths import bin_dir
from spanvm.kube import Kube

CHART = REPO / "charts" / "spanvm"
RELEASE, NS = "spanvm", "spanvm-system"
KUBE_VERSION = "1.35.4"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(bin_dir() / "helm"), *args], capture_output=True, text=True, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}: {result.stderr}")
    return result


def render(*sets: str, crds: bool = False) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(CHART), "-n", NS, "--kube-version", KUBE_VERSION]
    if crds:
        args.append("--include-crds")
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def test_helm_lint_strict() -> None:
    result = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION)
    assert "0 chart(s) failed" in result.stdout


def test_values_schema_rejects_bad_values_naming_the_field() -> None:
    args = ["template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION]
    bad = helm(*args, "--set", "agent.guestMemory=12x", check=False)
    assert bad.returncode != 0 and "/agent/guestMemory" in bad.stderr
    bad = helm(*args, "--set", "operator.replica=2", check=False)
    assert bad.returncode != 0 and "replica" in bad.stderr


def test_rendered_chart_passes_a_server_side_dry_run(crds: Cluster) -> None:
    kube = Kube.connect(str(crds.kubeconfig))
    ensure_namespace(kube, NS)
    docs = render(crds=True)
    kinds = sorted({d["kind"] for d in docs})
    assert {"CustomResourceDefinition", "Deployment", "DaemonSet", "ClusterRole"} <= set(kinds)
    crds.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(docs))


def test_operator_is_unprivileged_and_the_agent_privileges_are_explained() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render()}
    operator = docs[("Deployment", "spanvm-operator")]["spec"]
    assert operator["replicas"] == 2
    pod = operator["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["args"][0] == "operator"

    agent = docs[("DaemonSet", "spanvm-agent")]["spec"]["template"]["spec"]
    assert agent["hostNetwork"] is True
    env = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["containers"][0]["env"]
    }
    assert env == {
        "NODE_NAME": "spec.nodeName",
        "FABRIC_ADDRESS": "status.hostIP",
        "SPANVM_NAMESPACE": "metadata.namespace",
    }
    assert agent["containers"][0]["securityContext"]["privileged"] is True

    plugin = {
        (d["kind"], d["metadata"]["name"]): d
        for d in render("agent.kvmDeviceResource=devices.kubevirt.io/kvm")
    }
    unprivileged = plugin[("DaemonSet", "spanvm-agent")]["spec"]["template"]["spec"]
    sc = unprivileged["containers"][0]["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    limits = unprivileged["containers"][0]["resources"]["limits"]
    assert limits == {"devices.kubevirt.io/kvm": "1"}
    assert all(v["name"] != "kvm" for v in unprivileged["volumes"])


def test_dockerfile_lints_clean_and_matches_the_chart() -> None:
    hadolint = Path(os.environ.get("VIRTUAL_ENV", REPO / ".cache" / "venv")) / "bin" / "hadolint"
    result = subprocess.run(
        [str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["spanvm"]' in dockerfile  # the chart's args start with the subcommand
    assert "USER 65532:65532" in dockerfile  # the operator's runAsUser


def _agent_kubectl(
    cluster: Cluster, token: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl as the agent's service account with a node-bound token (what its pod gets)."""
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    ca = base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"])
    ca_file = cluster.kubeconfig.parent / "agent-test-ca.crt"
    ca_file.write_bytes(ca)
    return subprocess.run(
        [
            str(bin_dir() / "kubectl"),
            "--kubeconfig=/dev/null",
            f"--server={server}",
            f"--certificate-authority={ca_file}",
            f"--token={token}",
            *args,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_agent_rbac_and_admission_policy_confine_it_to_its_node(crds: Cluster) -> None:
    kube = Kube.connect(str(crds.kubeconfig))
    ensure_namespace(kube, NS)
    ensure_namespace(kube, "rbac-test")
    wanted = {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    docs = [d for d in render() if d["kind"] in wanted]
    crds.kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(docs))
    for node in ("rbac-a", "rbac-b"):
        crds.kubectl(
            "apply",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
        )
    fragment = {
        "apiVersion": "spanvm.io/v1alpha1",
        "kind": "VMFragment",
        "metadata": {"namespace": "rbac-test"},
        "spec": {
            "vmName": "v",
            "index": 0,
            "fragmentCount": 1,
            "vcpuIds": [0],
            "vcpuCount": 1,
            "memory": "64Mi",
            "boot": {"payload": {"name": "hello"}},
        },
    }
    for node in ("rbac-a", "rbac-b"):
        body = json.loads(json.dumps(fragment))
        body["metadata"]["name"] = f"frag-{node}"
        body["spec"]["nodeName"] = node
        crds.kubectl("apply", "-f", "-", stdin=json.dumps(body))
    token = crds.kubectl(
        "-n", NS, "create", "token", "spanvm-agent",
        "--bound-object-kind", "Node", "--bound-object-name", "rbac-a",
    ).stdout.strip()  # fmt: skip
    status = json.dumps({"status": {"phase": "Running"}})

    def patch_status(name: str) -> subprocess.CompletedProcess[str]:
        return _agent_kubectl(
            crds, token, "-n", "rbac-test", "patch", "vmfragment", name,
            "--subresource=status", "--type=merge", "-p", status,
        )  # fmt: skip

    # the policy takes a moment to be loaded by the API server
    import time  # noqa: PLC0415

    deadline = time.monotonic() + 30
    denied = patch_status("frag-rbac-b")
    while denied.returncode == 0 and time.monotonic() < deadline:
        time.sleep(1)
        denied = patch_status("frag-rbac-b")
    assert denied.returncode != 0
    assert "may only write VMFragments bound to it" in denied.stderr, denied.stderr
    own = patch_status("frag-rbac-a")
    assert own.returncode == 0, own.stderr

    spec_change = _agent_kubectl(
        crds, token, "-n", "rbac-test", "patch", "vmfragment", "frag-rbac-a",
        "--type=merge", "-p", '{"spec":{"desiredState":"Stopped"}}',
    )  # fmt: skip
    assert spec_change.returncode != 0 and "forbidden" in spec_change.stderr.lower()
    other_node = _agent_kubectl(crds, token, "label", "node", "rbac-b", "spanvm.io/kvm=true")
    assert other_node.returncode != 0 and "may not change node rbac-b" in other_node.stderr
    own_node = _agent_kubectl(crds, token, "label", "node", "rbac-a", "spanvm.io/kvm=true")
    assert own_node.returncode == 0, own_node.stderr
    secrets_list = _agent_kubectl(crds, token, "-n", "rbac-test", "get", "secrets")
    assert secrets_list.returncode != 0
    crds.kubectl(
        "-n", "rbac-test", "apply", "-f", "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "Secret",
                          "metadata": {"name": "fabric-of-a-vm"}, "data": {"fabric-key": "aw=="}}),
    )  # fmt: skip
    by_name = _agent_kubectl(crds, token, "-n", "rbac-test", "get", "secret", "fabric-of-a-vm")
    assert by_name.returncode != 0 and "forbidden" in by_name.stderr.lower()  # keys come sealed

    # Events on its fragments, as its own node only
    def post_event(instance: str) -> subprocess.CompletedProcess[str]:
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "frag-rbac-a.", "namespace": "rbac-test"},
            "involvedObject": {
                "kind": "VMFragment",
                "name": "frag-rbac-a",
                "namespace": "rbac-test",
            },
            "reason": "FabricConnected",
            "message": "fragment VMM running; fabric connected",
            "type": "Normal",
            "reportingComponent": "spanvm-agent",
            "reportingInstance": instance,
        }
        return _agent_kubectl(crds, token, "create", "-f", "-", stdin=json.dumps(event))

    as_other = post_event("rbac-b")
    assert as_other.returncode != 0 and "may only post Events as itself" in as_other.stderr
    as_itself = post_event("rbac-a")
    assert as_itself.returncode == 0, as_itself.stderr

    # Leases: its own only, held by its node; a 253-character node's Lease name is hashed
    long_node = "rbac-" + "l" * 248
    crds.kubectl(
        "apply", "-f", "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": long_node}}),
    )  # fmt: skip
    long_token = crds.kubectl(
        "-n", NS, "create", "token", "spanvm-agent",
        "--bound-object-kind", "Node", "--bound-object-name", long_node,
    ).stdout.strip()  # fmt: skip

    def create_lease(token: str, name: str, holder: str) -> subprocess.CompletedProcess[str]:
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 20},
        }
        return _agent_kubectl(crds, token, "create", "-f", "-", stdin=json.dumps(lease))

    other = create_lease(token, agent_lease_name("rbac-b"), "rbac-a")
    assert other.returncode != 0 and "may only renew its own Lease" in other.stderr
    posing = create_lease(token, agent_lease_name("rbac-a"), "rbac-b")
    assert posing.returncode != 0 and "may only renew its own Lease" in posing.stderr
    for tok, node in ((token, "rbac-a"), (long_token, long_node)):
        own = create_lease(tok, agent_lease_name(node), node)
        assert own.returncode == 0, own.stderr
        crds.kubectl("-n", NS, "delete", "lease", agent_lease_name(node))
    for node in ("rbac-a", "rbac-b", long_node):
        crds.kubectl("delete", "node", node)


LUA_HARNESS = """
local check = loadfile(arg[1])
obj = {obj}
local hs = check()
print(hs.status .. "|" .. hs.message)
"""


def _lua_table(value: Any) -> str:
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"[{json.dumps(k)}] = {_lua_table(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value)


HEALTH_CASES = [
    (None, 1, "Progressing|waiting for the spanvm operator"),
    (
        {"phase": "Pending", "message": "needs 8 vCPUs", "observedGeneration": 1},
        1,
        "Progressing|Pending: needs 8 vCPUs",
    ),
    ({"phase": "Running", "observedGeneration": 1}, 1, "Healthy|Running: Running"),
    (
        {"phase": "Running", "observedGeneration": 1},
        2,
        "Progressing|the operator has not acted on generation 2 yet",
    ),
    ({"phase": "Succeeded", "observedGeneration": 3}, 3, "Healthy|Succeeded: Succeeded"),
    (
        {"phase": "Degraded", "message": "node b lost", "observedGeneration": 1},
        1,
        "Degraded|Degraded: node b lost",
    ),
    ({"phase": "Failed", "message": "boom", "observedGeneration": 1}, 1, "Degraded|Failed: boom"),
    ({"phase": "Stopped", "observedGeneration": 1}, 1, "Suspended|Stopped: Stopped"),
]


@pytest.mark.parametrize(("status", "generation", "expected"), HEALTH_CASES)
def test_argocd_health_check(
    tmp_path: Path, status: dict[str, Any] | None, generation: int, expected: str
) -> None:
    obj: dict[str, Any] = {"metadata": {"generation": generation}}
    if status is not None:
        obj["status"] = status
    harness = tmp_path / "harness.lua"
    harness.write_text(LUA_HARNESS.replace("{obj}", _lua_table(obj)))
    result = subprocess.run(
        ["lua5.4", str(harness), str(CHART / "files" / "argocd-health.lua")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == expected


def test_argocd_health_check_is_shipped_in_the_chart() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render()}
    config = docs[("ConfigMap", "spanvm-argocd-health")]["data"]
    script = (CHART / "files" / "argocd-health.lua").read_text()
    assert config["resource.customizations.health.spanvm.io_SpanningVM"].strip() == script.strip()
