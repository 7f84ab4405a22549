"""Issue 18, installing and running spanvm as a cluster admin: a plain `helm template`, the
values a production install sets, CRDs upgraded by `helm upgrade` against the real API server
and kept by `helm uninstall`, the operator's RBAC as Kopf needs it, its metrics and health
endpoints, and the alert rules checked by promtool."""

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import Cluster
from k8s_sim import SimNodes, ensure_namespace, free_port, wait_for
from spanvm.api.crd import CRDS, crd_filename
from spanvm.api.crd import render as render_crd
from spanvm.devcluster.operator_proc import operator_command, start, stop
from spanvm.devcluster.paths import bin_dir
from spanvm.kube import Kube
from spanvm.sealing import (
    SealedForAnotherKey,
    load_or_create,
    open_sealed,
    public_text,
    seal,
    sealed_to,
)
from test_chart import CHART, NS, RELEASE, helm

KEEP = "helm.sh/resource-policy"


def plain_render(*sets: str, chart: Path = CHART) -> list[dict[str, Any]]:
    """`helm template` as a user types it: no --kube-version."""
    args = ["template", RELEASE, str(chart), "-n", NS]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_plain_helm_template_works_and_lint_strict_passes() -> None:
    docs = plain_render()
    assert ("Deployment", "spanvm-operator") in by_kind(docs)
    lint = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in lint.stdout


def test_crds_are_templates_kept_on_uninstall_and_match_the_models() -> None:
    crds = [d for d in plain_render() if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == len(CRDS)
    for crd in CRDS:
        rendered = next(d for d in crds if d["spec"]["names"]["kind"] == crd.kind)
        assert rendered["metadata"]["annotations"] == {KEEP: "keep"}
        assert rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        generated = yaml.safe_load(render_crd(crd))
        assert rendered["spec"] == generated["spec"]
    assert not (CHART / "crds").exists()  # Helm would install those once and never upgrade
    assert not [d for d in plain_render("crds.install=false") if d["kind"].startswith("Custom")]


def _walk_descriptions(schema: dict[str, Any], path: str = "") -> list[str]:
    missing = []
    for name, prop in schema.get("properties", {}).items():
        if "description" not in prop:
            missing.append(f"{path}/{name}")
        missing += _walk_descriptions(prop, f"{path}/{name}")
    return missing


def test_every_value_is_described_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _walk_descriptions(schema) == []
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def keys(tree: dict[str, Any], props: dict[str, Any], path: str = "") -> list[str]:
        out = []
        for key, value in tree.items():
            assert key in props, f"{path}/{key} is in values.yaml but not in the schema"
            out.append(f"{path}/{key}")
            if isinstance(value, dict) and "properties" in props[key]:
                out += keys(value, props[key]["properties"], f"{path}/{key}")
        return out

    assert len(keys(values, schema["properties"])) > 40


def test_production_knobs_reach_both_pods() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    }
    sets = [
        "imagePullSecrets[0].name=regcred",
        "operator.priorityClassName=ops-critical",
        "operator.tolerations[0].key=infra",
        "operator.tolerations[0].operator=Exists",
        "agent.resources.limits.memory=1Gi",
        "operator.resources.limits.memory=256Mi",
        f"operator.affinity={json.dumps(affinity)}",
        f"agent.affinity={json.dumps(affinity)}",
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=kube-prometheus",
        "metrics.prometheusRule.enabled=true",
    ]
    flags = [x for s in sets for x in ("--set-json", _as_json(s))]
    rendered = helm("template", RELEASE, str(CHART), "-n", NS, *flags).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    objs = by_kind(docs)
    operator = objs[("Deployment", "spanvm-operator")]["spec"]["template"]["spec"]
    agent = objs[("DaemonSet", "spanvm-agent")]["spec"]["template"]["spec"]
    for pod in (operator, agent):
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["affinity"] == affinity
    assert operator["priorityClassName"] == "ops-critical"
    assert agent["priorityClassName"] == "system-node-critical"
    assert operator["tolerations"] == [{"key": "infra", "operator": "Exists"}]
    assert operator["containers"][0]["resources"]["limits"] == {"memory": "256Mi"}
    assert agent["containers"][0]["resources"]["limits"] == {"memory": "1Gi"}
    monitor = objs[("ServiceMonitor", "spanvm")]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    selected = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service"]
    assert {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in services} == {
        "operator",
        "agent",
    }
    for service in services:
        assert selected.items() <= service["metadata"]["labels"].items()
        assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    rule = objs[("PrometheusRule", "spanvm")]
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "SpanVMFailed",
        "SpanVMDegraded",
        "SpanVMUnschedulable",
        "SpanVMRemoteFaultLatencyHigh",
        "SpanVMAgentHeartbeatLost",
    } <= alerts
    dashboard = json.loads(objs[("ConfigMap", "spanvm-grafana-dashboard")]["data"]["spanvm.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("spanvm_vms", "spanvm_fragment_remote_fault_seconds_bucket", "spanvm_nodes_kvm"):
        assert metric in exprs


def _as_json(setting: str) -> str:
    """--set-json form of key=value (values that are not JSON become JSON strings)."""
    key, value = setting.split("=", 1)
    try:
        json.loads(value)
    except json.JSONDecodeError:
        value = json.dumps(value)
    return f"{key}={value}"


def test_pdb_and_probes() -> None:
    objs = by_kind(plain_render())
    pdb = objs[("PodDisruptionBudget", "spanvm-operator")]["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert ("PodDisruptionBudget", "spanvm-operator") not in by_kind(
        plain_render("operator.replicas=1")
    )
    operator = objs[("Deployment", "spanvm-operator")]["spec"]["template"]["spec"]
    container = operator["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"--health-port={ports['health']}" in container["args"]
    agent = objs[("DaemonSet", "spanvm-agent")]["spec"]["template"]["spec"]["containers"][0]
    for probe in ("livenessProbe", "readinessProbe"):
        assert agent[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    agent_ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert f"--metrics-port={agent_ports['metrics']}" in agent["args"]


def test_promtool_checks_the_alert_rules(tmp_path: Path) -> None:
    objs = by_kind(plain_render("metrics.prometheusRule.enabled=true"))
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(objs[("PrometheusRule", "spanvm")]["spec"]))
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def _crd(cluster: Cluster, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "crd", name, "-o", "json").stdout
    crd: dict[str, Any] = json.loads(out)
    return crd


def test_helm_upgrade_upgrades_a_changed_crd_and_uninstall_keeps_them(
    crds: Cluster, tmp_path: Path
) -> None:
    kube = Kube.connect(str(crds.kubeconfig))
    ensure_namespace(kube, NS)
    env_kubeconfig = ("--kubeconfig", str(crds.kubeconfig))
    # The session's CRDs were applied by kubectl: the chart takes them over, as an install
    # over CRDs a user applied by hand would.
    helm("install", RELEASE, str(CHART), "-n", NS, "--take-ownership", *env_kubeconfig)
    try:
        changed = tmp_path / "spanvm"
        shutil.copytree(CHART, changed)
        name = crd_filename(CRDS[0])
        crd_file = changed / "files" / "crds" / name
        crd = yaml.safe_load(crd_file.read_text())
        columns = crd["spec"]["versions"][0].setdefault("additionalPrinterColumns", [])
        columns.append({"name": "Upgraded", "type": "string", "jsonPath": ".spec.runStrategy"})
        crd_file.write_text(yaml.safe_dump(crd, sort_keys=False))
        helm("upgrade", RELEASE, str(changed), "-n", NS, *env_kubeconfig)
        live = _crd(crds, crd["metadata"]["name"])
        names = [c["name"] for c in live["spec"]["versions"][0]["additionalPrinterColumns"]]
        assert "Upgraded" in names
        assert live["metadata"]["annotations"][KEEP] == "keep"
        helm("upgrade", RELEASE, str(CHART), "-n", NS, *env_kubeconfig)
        live = _crd(crds, crd["metadata"]["name"])
        names = [c["name"] for c in live["spec"]["versions"][0]["additionalPrinterColumns"]]
        assert "Upgraded" not in names
    finally:
        # no kubelet runs the pre-delete hook's Job here: the next test plays it
        uninstall = helm("uninstall", RELEASE, "-n", NS, "--no-hooks", *env_kubeconfig)
    assert "kept due to the resource policy" in uninstall.stdout + uninstall.stderr
    for crd in CRDS:
        kept = _crd(crds, f"{crd.plural}.spanvm.io")
        assert kept["metadata"].get("deletionTimestamp") is None
    assert crds.kubectl("get", "deployment", "-n", NS, "spanvm-operator", check=False).returncode


def _token_kubeconfig(cluster: Cluster, account: str, path: Path) -> Path:
    token = cluster.kubectl("-n", NS, "create", "token", account).stdout.strip()
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    cluster_entry = config["clusters"][0]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster_entry],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": account,
                        "context": {"cluster": cluster_entry["name"], "user": account},
                    }
                ],
                "current-context": account,
            }
        )
    )
    return path


def scrape(port: int) -> dict[str, Any]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_operator_with_the_charts_rbac_lists_crds_and_serves_metrics_and_health(
    crds: Cluster, tmp_path: Path
) -> None:
    """As the chart's service account: Kopf's CRD scan is allowed, the leader's gauges count
    VMs by phase, /healthz is Kopf's liveness endpoint, no `_created` series."""
    kube = Kube.connect(str(crds.kubeconfig))
    ensure_namespace(kube, NS)
    watched = "prod-metrics"
    ensure_namespace(kube, watched)
    rbac = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    docs = [d for d in plain_render() if d["kind"] in rbac]
    crds.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump_all(docs)
    )
    kubeconfig = _token_kubeconfig(crds, "spanvm-operator", tmp_path / "operator.kubeconfig")
    vm = {
        "apiVersion": "spanvm.io/v1alpha1",
        "kind": "SpanningVM",
        "metadata": {"name": "no-room", "namespace": watched},
        "spec": {
            "cpu": {"vcpus": 2},
            "memory": "256Mi",
            "boot": {"payload": {"name": "smp-sum"}},
            "placement": {"nodeSelector": {"pool": "nowhere-18"}},
        },
    }
    crds.kubectl("apply", "-f", "-", stdin=json.dumps(vm))
    metrics_port, health_port = free_port(), free_port()
    log = tmp_path / "operator.log"
    command = operator_command(
        kubeconfig,
        system_namespace=NS,
        namespaces=(watched,),
        metrics_port=metrics_port,
        health_port=health_port,
    )
    process = start(command, log)
    try:
        wait_for("the operator to lead", lambda: "holding the operator Lease" in log.read_text())
        wait_for(
            "the VM to be found unschedulable",
            lambda: "Unschedulable" in json.dumps(kube.get_vm(watched, "no-room") or {}),
        )

        def gauges() -> dict[str, Any] | None:
            families = scrape(metrics_port)
            return families if "spanvm_vms" in families else None

        families = wait_for("the leader's gauges", gauges)
        wait_for(
            "Kopf's liveness endpoint",
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=5).status
                == 200
            ),
        )
        health = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=5).read()
        )
        assert isinstance(health, dict)  # Kopf's liveness answers with its probes' JSON
        time.sleep(2)  # Kopf's scans go on in the background
    finally:
        stop(process)
        print(log.read_text()[-3000:])
        crds.kubectl("delete", "spanningvm", "-n", watched, "no-room", "--wait=false")
    text = log.read_text()
    assert "cannot list" not in text and "forbidden" not in text.lower(), text[-3000:]
    phases = {s.labels["phase"]: s.value for s in families["spanvm_vms"].samples}
    assert families["spanvm_vms"].type == "gauge"
    assert phases["Pending"] == 1 and phases["Running"] == 0, phases
    assert set(phases) >= {"Pending", "Running", "Failed", "Degraded", "Succeeded"}
    unschedulable = families["spanvm_vm_unschedulable"].samples
    assert [(s.labels["vm"], s.value) for s in unschedulable] == [("no-room", 1.0)]
    assert families["spanvm_operator_leader"].samples[0].value == 1.0
    info = families["spanvm_build_info"].samples[0]  # an info metric: a gauge of 1
    assert info.value == 1.0 and info.labels["version"] and info.labels["python"]
    assert families["spanvm_nodes_kvm"].type == "gauge"
    assert families["spanvm_reconcile"].type == "counter"
    all_samples = [s.name for f in families.values() for s in f.samples]
    assert not [n for n in all_samples if n.endswith("_created")]


def _vm(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "spanvm.io/v1alpha1",
        "kind": "SpanningVM",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "cpu": {"vcpus": 2},
            "memory": "256Mi",
            "boot": {"payload": {"name": "smp-sum"}},
            "placement": {"nodeSelector": {"pool": "nowhere-18"}},
        },
    }


def test_helm_uninstall_runs_the_hook_and_leaves_no_vm_on_its_finalizer(
    crds: Cluster, tmp_path: Path
) -> None:
    """The pre-delete hook runs while the operator still does. There is no kubelet here, so
    the test runs the hook Job's container as its pod would (its args, its service account's
    token), then deletes the Job, which lets Helm go on."""
    kube = Kube.connect(str(crds.kubeconfig))
    ensure_namespace(kube, NS)
    watched = "prod-uninstall"
    ensure_namespace(kube, watched)
    kubeconfig = ("--kubeconfig", str(crds.kubeconfig))
    helm(
        "install", RELEASE, str(CHART), "-n", NS, "--take-ownership",
        "--set", f"operator.watchNamespaces={{{watched}}}", *kubeconfig,
    )  # fmt: skip
    # The VM is placed and owns a fragment (so the operator has put its finalizer on it);
    # no agent runs the fragment, so its deletion stops waiting after --deletion-grace.
    nodes = SimNodes(kube)
    nodes.add("uninstall-18-a", vcpus=2, labels={"pool": "uninstall-18"})
    vm = _vm("left-behind", watched)
    vm["spec"]["placement"]["nodeSelector"] = {"pool": "uninstall-18"}
    crds.kubectl("apply", "-f", "-", stdin=json.dumps(vm))
    log = tmp_path / "operator.log"
    operator = start(
        operator_command(
            crds.kubeconfig, system_namespace=NS, namespaces=(watched,), deletion_grace=2
        ),
        log,
    )
    uninstall: subprocess.Popen[str] | None = None
    try:
        wait_for(
            "the operator's finalizer on the VM",
            lambda: (
                "spanvm.io/finalizer"
                in ((kube.get_vm(watched, "left-behind") or {}).get("metadata") or {}).get(
                    "finalizers", []
                )
            ),
        )
        uninstall = subprocess.Popen(
            [str(bin_dir() / "helm"), "uninstall", RELEASE, "-n", NS, "--timeout", "120s",
             *kubeconfig],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        job = wait_for(
            "the pre-delete hook Job",
            lambda: json.loads(
                crds.kubectl(
                    "get", "job", "-n", NS, f"{RELEASE}-uninstall", "-o", "json", check=False
                ).stdout
                or "null"
            ),
        )
        pod = job["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        assert args[0] == "uninstall" and f"--namespace={watched}" in args
        token_config = _token_kubeconfig(crds, pod["serviceAccountName"], tmp_path / "hook.kc")
        hook = subprocess.run(
            [sys.executable, "-m", "spanvm.cli", *args, "--kubeconfig", str(token_config)],
            capture_output=True, text=True, check=False, timeout=150,
        )  # fmt: skip
        assert hook.returncode == 0, hook.stdout + hook.stderr
        assert "0 had their finalizer removed" in hook.stdout  # the operator released them
        crds.kubectl("delete", "job", "-n", NS, f"{RELEASE}-uninstall", "--wait=false")
        out, _ = uninstall.communicate(timeout=120)
        assert uninstall.returncode == 0, out
    finally:
        stop(operator)
        nodes.delete_all()
        if uninstall is not None and uninstall.poll() is None:
            uninstall.kill()
    assert kube.get_vm(watched, "left-behind") is None
    assert crds.kubectl("get", "deployment", "-n", NS, "spanvm-operator", check=False).returncode
    assert "spanningvms.spanvm.io" in crds.kubectl("get", "crd").stdout  # kept


def test_the_uninstall_hook_without_an_operator_drops_the_finalizer(crds: Cluster) -> None:
    kube = Kube.connect(str(crds.kubeconfig))
    watched = "prod-orphan"
    ensure_namespace(kube, watched)
    vm = _vm("orphan", watched)
    vm["metadata"]["finalizers"] = ["spanvm.io/finalizer"]
    crds.kubectl("apply", "-f", "-", stdin=json.dumps(vm))
    hook = subprocess.run(
        [sys.executable, "-m", "spanvm.cli", "uninstall", "--timeout", "2",
         "--namespace", watched, "--kubeconfig", str(crds.kubeconfig)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert hook.returncode == 0, hook.stderr
    assert "1 had their finalizer removed" in hook.stdout
    assert "still there after 2s (no operator?)" in hook.stderr
    wait_for("the VM to go", lambda: kube.get_vm(watched, "orphan") is None)


def test_a_fabric_key_sealed_to_one_node_opens_only_there(tmp_path: Path) -> None:
    node_a = load_or_create(tmp_path / "a.key")
    node_b = load_or_create(tmp_path / "b.key")
    assert bytes(load_or_create(tmp_path / "a.key")) == bytes(node_a)  # kept across restarts
    assert (tmp_path / "a.key").stat().st_mode & 0o777 == 0o600
    sealed = seal(b"the VM's fabric key", public_text(node_a))
    assert open_sealed(sealed, node_a) == b"the VM's fabric key"
    with pytest.raises(SealedForAnotherKey):
        open_sealed(sealed, node_b)
    forged = f"{sealed_to(seal(b'x', public_text(node_b)))}:{sealed.split(':', 1)[1]}"
    with pytest.raises(SealedForAnotherKey):  # right fingerprint, box for another key
        open_sealed(forged, node_b)
