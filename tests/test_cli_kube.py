"""`spanvm` against the real API server, kubectl's habits: the kubeconfig's context and
namespace, `--context`, `-n`, `-A`, `-o`, exit 1 on NotFound and 2 on usage errors, one-line
errors for an unreachable server and denied RBAC; the verbs' changes to the VM; `wait`;
`console --follow` from status as the agent and operator write it."""

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import Cluster
from k8s_sim import ensure_namespace, vm_manifest, wait_for
from spanvm.api.constants import (
    GROUP,
    PAUSED_ANNOTATION,
    REQUEST_ANNOTATION,
    SPANNINGVM_PLURAL,
    VERSION,
)
from spanvm.kube import JsonObject, Kube
from spanvm_cli import cli_env, spanvm

pytestmark = pytest.mark.cluster
NS_A, NS_B = "cli-a", "cli-b"


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """stderr, checked to be exactly one line and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def kube(crds: Cluster) -> Kube:
    return Kube.connect(str(crds.kubeconfig))


@pytest.fixture(scope="module")
def kubeconfig(crds: Cluster, kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cluster's kubeconfig with more contexts: the current one in namespace cli-a,
    `other` in cli-b, `nowhere` at a port nothing listens on, `viewer` a service account
    with no RBAC at all."""
    for ns in (NS_A, NS_B):
        ensure_namespace(kube, ns)
    crds.kubectl("create", "serviceaccount", "viewer", "-n", NS_A, check=False)
    token = crds.kubectl("create", "token", "viewer", "-n", NS_A).stdout.strip()
    config = yaml.safe_load(crds.kubeconfig.read_text())
    cluster = config["clusters"][0]
    user = config["users"][0]["name"]
    config["clusters"].append(
        {"name": "nowhere", "cluster": {**cluster["cluster"], "server": "https://127.0.0.1:1"}}
    )
    config["users"].append({"name": "viewer", "user": {"token": token}})
    config["contexts"] = [
        {"name": "ctx-a", "context": {"cluster": cluster["name"], "user": user, "namespace": NS_A}},
        {"name": "other", "context": {"cluster": cluster["name"], "user": user, "namespace": NS_B}},
        {"name": "nowhere", "context": {"cluster": "nowhere", "user": user}},
        {"name": "viewer", "context": {"cluster": cluster["name"], "user": "viewer"}},
    ]
    config["current-context"] = "ctx-a"
    path = tmp_path_factory.mktemp("kubeconfig") / "config"
    path.write_text(yaml.safe_dump(config))
    return path


def create(kube: Kube, body: JsonObject) -> None:
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, body["metadata"]["namespace"], SPANNINGVM_PLURAL, body
    )


@pytest.fixture
def vms(kube: Kube) -> Iterator[None]:
    """`web` (Always) in cli-a, `db` (Manual) in cli-b; no operator runs here."""
    create(kube, vm_manifest("web", NS_A, "p", run_strategy="Always"))
    create(kube, vm_manifest("db", NS_B, "p", run_strategy="Manual"))
    try:
        yield
    finally:
        for ns, name in ((NS_A, "web"), (NS_B, "db")):
            kube.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, SPANNINGVM_PLURAL, name)


def write_status(kube: Kube, ns: str, name: str, status: JsonObject) -> None:
    kube.patch_vm_status(ns, name, status)


@pytest.mark.usefixtures("vms")
def test_namespace_and_context_come_from_the_kubeconfig(kubeconfig: Path) -> None:
    """It used to look in `default` whatever the context said, and had no --context."""
    here = spanvm("status", "web", kubeconfig=kubeconfig)
    assert here.returncode == 0, here.stderr
    assert here.stdout.startswith("cli-a/web: ") and "runStrategy Always" in here.stdout
    missing = spanvm("status", "db", kubeconfig=kubeconfig)
    assert missing.returncode == 1  # NotFound is not a usage error (it used to exit 2)
    assert one_line(missing) == (
        'spanvm: error: spanningvm.spanvm.io "db" in namespace "cli-a" not found'
    )
    assert spanvm("status", "db", "--context", "other", kubeconfig=kubeconfig).returncode == 0
    assert spanvm("status", "db", "-n", NS_B, kubeconfig=kubeconfig).returncode == 0
    unknown = spanvm("status", "db", "--context", "nope", kubeconfig=kubeconfig)
    assert unknown.returncode == 1 and 'context "nope" is not in the kubeconfig' in one_line(
        unknown
    )


@pytest.mark.usefixtures("vms")
def test_all_namespaces_and_output_formats(kubeconfig: Path, kube: Kube) -> None:
    write_status(kube, NS_A, "web", {"phase": "Running", "message": "the guest runs"})
    listed = spanvm("status", "-A", kubeconfig=kubeconfig)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["NAMESPACE", "NAME", "STATUS"]
    assert [r.split()[:2] for r in rows if r.split()[1] in ("web", "db")] == [
        ["cli-a", "web"],
        ["cli-b", "db"],
    ]
    wide = spanvm("status", "-o", "wide", kubeconfig=kubeconfig).stdout.splitlines()
    assert wide[0].split()[-5:] == ["PHASE", "STRATEGY", "RESTARTS", "EXIT", "MESSAGE"]
    assert wide[1].split()[0] == "web" and wide[1].endswith("the guest runs")
    as_json = json.loads(spanvm("status", "web", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert as_json["metadata"]["name"] == "web" and as_json["status"]["phase"] == "Running"
    as_yaml = yaml.safe_load(spanvm("status", "-A", "-o", "yaml", kubeconfig=kubeconfig).stdout)
    assert as_yaml["kind"] == "List"
    assert {"web", "db"} <= {i["metadata"]["name"] for i in as_yaml["items"]}
    names = spanvm("status", "-o", "name", kubeconfig=kubeconfig).stdout.split()
    assert names == ["spanningvm.spanvm.io/web"]
    bad = spanvm("status", "web", "-o", "table", kubeconfig=kubeconfig)
    assert bad.returncode == 2 and "Invalid value for '-o'" in one_line(bad)


def test_unreachable_server_and_denied_rbac_are_one_line(kubeconfig: Path) -> None:
    """The API server down used to end in a 100-line traceback."""
    down = spanvm("status", "web", "--context", "nowhere", kubeconfig=kubeconfig)
    assert down.returncode == 1
    assert one_line(down).startswith(
        "spanvm: error: cannot reach the API server at 127.0.0.1:1 (connection refused)"
    )
    denied = spanvm("stop", "web", "--context", "viewer", "-n", NS_A, kubeconfig=kubeconfig)
    assert denied.returncode == 1
    line = one_line(denied)
    assert line.startswith("spanvm: error: Forbidden: ") and "system:serviceaccount" in line
    assert 'cannot get resource "spanningvms"' in line


def test_a_kubeconfig_that_cannot_be_read_is_named_with_where_it_came_from(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere" / "config"
    env = spanvm("status", "web", kubeconfig=missing)
    assert env.returncode == 1
    assert one_line(env) == f"spanvm: error: kubeconfig {missing} (from $KUBECONFIG): no such file"
    option = spanvm("status", "web", "--kubeconfig", str(missing))
    assert one_line(option) == (
        f"spanvm: error: kubeconfig {missing} (from --kubeconfig): no such file"
    )
    for name, text in (("junk", "just: text\n"), ("broken", "a: [\n"), ("list", "- a\n")):
        junk = tmp_path / name
        junk.write_text(text)
        unusable = spanvm("status", "web", kubeconfig=junk)
        assert unusable.returncode == 1
        line = one_line(unusable)  # one line, no traceback, whatever the file holds
        assert line.startswith(f"spanvm: error: kubeconfig {junk} (from $KUBECONFIG): "), line
    directory = spanvm("status", "web", kubeconfig=tmp_path)
    assert (
        one_line(directory)
        == f"spanvm: error: kubeconfig {tmp_path} (from $KUBECONFIG): Is a directory"
    )


@pytest.mark.usefixtures("vms")
def test_verbs_change_the_vm_as_virtctl_does(kubeconfig: Path, kube: Kube) -> None:
    def vm(ns: str, name: str) -> JsonObject:
        found = kube.get_vm(ns, name)
        assert found is not None
        return found

    stopped = spanvm("stop", "web", kubeconfig=kubeconfig)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == "spanningvm.spanvm.io/web: runStrategy Always -> Halted"
    assert vm(NS_A, "web")["spec"]["runStrategy"] == "Halted"
    again = spanvm("stop", "web", kubeconfig=kubeconfig)
    assert again.returncode == 0 and "already stopped" in again.stdout
    refused = spanvm("restart", "web", kubeconfig=kubeconfig)
    assert refused.returncode == 1 and "start it with `spanvm start`" in one_line(refused)
    assert spanvm("start", "web", kubeconfig=kubeconfig).returncode == 0
    assert vm(NS_A, "web")["spec"]["runStrategy"] == "Always"

    # Manual: the strategy stays; start/stop/restart are requests, each with a new id
    seen = set()
    for verb in ("start", "restart", "stop"):
        result = spanvm(verb, "db", "-n", NS_B, kubeconfig=kubeconfig)
        assert result.returncode == 0, result.stderr
        request = vm(NS_B, "db")["metadata"]["annotations"][REQUEST_ANNOTATION]
        assert request.startswith(f"{verb}/") and request not in seen
        seen.add(request)
        assert vm(NS_B, "db")["spec"]["runStrategy"] == "Manual"

    assert spanvm("pause", "web", kubeconfig=kubeconfig).returncode == 0
    assert vm(NS_A, "web")["metadata"]["annotations"][PAUSED_ANNOTATION] == "true"
    assert "paused on request" in spanvm("status", "web", kubeconfig=kubeconfig).stdout
    assert spanvm("unpause", "web", kubeconfig=kubeconfig).returncode == 0
    assert PAUSED_ANNOTATION not in (vm(NS_A, "web")["metadata"].get("annotations") or {})
    gone = spanvm("start", "nothere", kubeconfig=kubeconfig)
    assert gone.returncode == 1 and "not found" in one_line(gone)


@pytest.mark.usefixtures("vms")
def test_wait_for_a_phase_a_condition_or_a_timeout(kubeconfig: Path, kube: Kube) -> None:
    later = threading.Timer(
        1.5,
        write_status,
        (kube, NS_A, "web", {"phase": "Running", "conditions": [_ready("True")]}),
    )
    later.start()
    started = time.monotonic()
    result = spanvm("wait", "web", "--for=phase=Running", "--timeout=30s", kubeconfig=kubeconfig)
    later.join()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "spanningvm.spanvm.io/web condition met"
    assert time.monotonic() - started >= 1.5
    ready = spanvm("wait", "web", "--for", "condition=Ready", kubeconfig=kubeconfig)
    assert ready.returncode == 0, ready.stderr
    lower = spanvm("wait", "web", "--for", "condition=ready=true", kubeconfig=kubeconfig)
    assert lower.returncode == 0, lower.stderr  # kubectl wait's case-insensitive match
    timed_out = spanvm(
        "wait", "web", "--for=phase=Succeeded", "--timeout=1s", kubeconfig=kubeconfig
    )
    assert timed_out.returncode == 1
    assert "timed out after 1s waiting for phase=Succeeded" in one_line(timed_out)
    assert "(phase Running" in one_line(timed_out)
    bad = spanvm("wait", "web", "--for=colour=red", kubeconfig=kubeconfig)
    assert bad.returncode == 2
    for never, needle in (
        ("phase=Bogus", "no SpanningVM phase 'Bogus' (one of Pending, "),
        ("status=running", "no SpanningVM status 'running'"),
        ("condition=Redy", "no SpanningVM condition 'Redy'"),
        ("condition=Ready=yes", "a condition's status is True, False or Unknown"),
        ("phase=running", "no SpanningVM phase 'running'"),
    ):  # values that can never match: refused at once, not waited on until the timeout
        refused = spanvm("wait", "web", f"--for={never}", kubeconfig=kubeconfig)
        assert refused.returncode == 2 and needle in refused.stderr, refused.stderr
    deleted = spanvm("wait", "nothere", "--for=delete", kubeconfig=kubeconfig)
    assert deleted.returncode == 0 and "deleted" in deleted.stdout


def _ready(status: str) -> JsonObject:
    return {
        "type": "Ready",
        "status": status,
        "reason": "GuestRunning",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


@pytest.mark.usefixtures("vms")
def test_console_follow_prints_each_byte_once_and_says_what_it_missed(
    kubeconfig: Path, kube: Kube
) -> None:
    """What fragment 0's agent publishes (the tail, the byte count), followed live."""
    write_status(
        kube, NS_A, "web", {"phase": "Running", "consoleTail": "boot\n", "consoleBytes": 5}
    )
    env = cli_env(kubeconfig)
    follower = subprocess.Popen(
        [sys.executable, "-m", "spanvm.cli", "console", "web", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    printed: list[str] = []
    assert follower.stdout is not None
    reader = threading.Thread(
        target=lambda: printed.extend(iter(lambda: follower.stdout.read(1), "")),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()

    def shows(text: str) -> None:
        wait_for(f"the follower to print {text!r}", lambda: "".join(printed) == text, 60)

    try:
        shows("boot\n")
        write_status(kube, NS_A, "web", {"consoleTail": "boot\none\n", "consoleBytes": 9})
        shows("boot\none\n")
        # more than a tail was written between two looks: 1000 bytes not shown
        write_status(kube, NS_A, "web", {"consoleTail": "two\n", "consoleBytes": 1013})
        shows("boot\none\n\n[... 1000 bytes not shown ...]\ntwo\n")
        write_status(
            kube,
            NS_A,
            "web",
            {"consoleTail": "two\nend\n", "consoleBytes": 1017, "phase": "Succeeded"},
        )
        shows("boot\none\n\n[... 1000 bytes not shown ...]\ntwo\nend\n")
        assert follower.poll() is None  # Always would restart the guest: it follows on
        kube.custom.patch_namespaced_custom_object(
            GROUP, VERSION, NS_A, SPANNINGVM_PLURAL, "web", {"spec": {"runStrategy": "Once"}}
        )
        assert follower.wait(timeout=30) == 0, follower.stderr
    finally:
        if follower.poll() is None:
            follower.kill()
    reader.join(5)
    plain = spanvm("console", "web", kubeconfig=kubeconfig)
    assert plain.returncode == 0 and plain.stdout == "two\nend\n"
