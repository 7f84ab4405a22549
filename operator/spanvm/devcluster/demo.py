"""The main job on the embedded default (`make demo`): a real control plane, three simulated
nodes each with its agent in its own network namespace, the operator, and `kubectl apply` of
a SpanningVM whose guest spans two of the nodes. Shows progress while it waits, prints the
guest console and where each vCPU ran, then deletes the VM and cleans everything up."""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import yaml

from spanvm.api.constants import KVM_LABEL, SYSTEM_NAMESPACE
from spanvm.devcluster.controlplane import ControlPlane
from spanvm.devcluster.nodes import SimulatedNodes
from spanvm.devcluster.operator_proc import operator_command, start, stop
from spanvm.devcluster.paths import cache_dir, kubectl, repo_root
from spanvm.kube import Kube
from spanvm.status_view import console, describe
from spanvm.vmm.expected import smp_sum

BOLD, RESET = "\033[1m", "\033[0m"
FINAL = ("Succeeded", "Failed")


def step(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


class Demo:
    """One run of the demo; `run()` returns the exit status."""

    def __init__(self, example: Path, node_count: int, timeout: float) -> None:
        self.example, self.timeout = example, timeout
        self.plane = ControlPlane(cache_dir() / "cluster")
        self.work = cache_dir() / "demo"
        self.names = [f"node-{i + 1}" for i in range(node_count)]
        manifest = yaml.safe_load(example.read_text())
        self.vm_name = manifest["metadata"]["name"]
        self.namespace = manifest["metadata"].get("namespace", "default")
        self.payload = manifest["spec"]["boot"].get("payload") or {}

    def kubectl(self, *args: str, check: bool = True) -> str:
        env = {**os.environ, "KUBECONFIG": str(self.plane.kubeconfig)}
        result = subprocess.run(
            [kubectl(), *args], capture_output=True, text=True, env=env, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout + result.stderr

    def run(self) -> int:
        step("control plane: etcd + kube-apiserver + kube-controller-manager on loopback")
        self.plane.up()
        print(f"  KUBECONFIG={self.plane.kubeconfig}")
        kube = Kube.connect(str(self.plane.kubeconfig))
        step("CRDs")
        print(self.kubectl("apply", "-f", str(repo_root() / "crds")).rstrip())
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        self.kubectl("create", "namespace", SYSTEM_NAMESPACE, check=False)
        self.kubectl("delete", "-f", str(self.example), "--ignore-not-found", "--wait=true")

        step(f"{len(self.names)} simulated nodes, each with its agent in its own network namespace")
        nodes = SimulatedNodes(
            kube,
            self.plane.kubeconfig,
            self.plane.ports.apiserver,
            self.names,
            self.work,
            system_namespace=SYSTEM_NAMESPACE,
        )
        operator = None
        try:
            nodes.up()
            nodes.wait_kvm_labelled()
            print(self.kubectl("get", "nodes", "-L", f"{KVM_LABEL},spanvm.io/kvm-flavour").rstrip())
            step("the operator (Kopf, behind its leader Lease)")
            operator = start(
                operator_command(self.plane.kubeconfig, system_namespace=SYSTEM_NAMESPACE),
                self.work / "operator.log",
            )
            print(f"  log: {self.work / 'operator.log'}")
            step(f"kubectl apply -f {self.example.relative_to(repo_root())}")
            print(self.kubectl("apply", "-f", str(self.example)).rstrip())
            invalid = repo_root() / "examples" / "invalid" / "more-fragments-than-vcpus.yaml"
            print(f"  and a manifest the API server refuses ({invalid.name}):")
            refused = self.kubectl("apply", "--dry-run=server", "-f", str(invalid), check=False)
            print("    " + refused.strip().replace("\n", "\n    "))
            phase = self._follow(kube)
            vm = kube.get_vm(self.namespace, self.vm_name) or {}
            step("spanvm status / spanvm console")
            print(describe(vm))
            print("  console:\n    " + console(vm).rstrip().replace("\n", "\n    "))
            print(self.kubectl("get", "svm", self.vm_name, "-n", self.namespace, "-o", "wide"))
            print(
                self.kubectl(
                    "get", "vmfragments", "-n", self.namespace, "-o", "wide",
                    "-l", f"spanvm.io/vm={self.vm_name}",
                ).rstrip()
            )  # fmt: skip
            ok = phase == "Succeeded" and self._check_result(vm)
            step("delete the SpanningVM (finalizer: fragments stop first)")
            self.kubectl("delete", "-f", str(self.example), "--wait=true", "--timeout=120s")
            left = self.kubectl("get", "vmfragments", "-n", self.namespace, "-o", "name")
            print(f"  SpanningVM deleted; fragments left: {left.strip() or 'none'}")
            return 0 if ok else 1
        finally:
            step("cleaning up: operator, agents, fragment processes, namespaces, nodes")
            if operator is not None:
                stop(operator)
            nodes.down()
            print(f"  the control plane keeps running (KUBECONFIG={self.plane.kubeconfig});")
            print("  stop it with 'hack/control-plane down'")

    def _follow(self, kube: Kube) -> str:
        """Print each change of phase and fragment phases until the guest finishes."""
        started = time.monotonic()
        seen = ""
        phase = ""
        while time.monotonic() - started < self.timeout:
            vm = kube.get_vm(self.namespace, self.vm_name) or {}
            status = vm.get("status") or {}
            phase = status.get("phase") or "Pending"
            frags = ", ".join(
                f"{f['name']}@{f['nodeName']}={f.get('phase')}"
                for f in status.get("fragments") or []
            )
            line = f"{phase}  {frags}  {status.get('message', '')}"
            if line != seen:
                print(f"  [{time.monotonic() - started:5.1f}s] {line}", flush=True)
                seen = line
            if phase in FINAL:
                return phase
            time.sleep(0.3)
        print(f"  gave up after {self.timeout:.0f}s")
        return phase

    def _check_result(self, vm: dict[str, object]) -> bool:
        if self.payload.get("name") != "smp-sum":
            return True
        expected = smp_sum(int(self.payload.get("arg") or 1 << 20))
        text = console(vm)
        nodes = {f["nodeName"] for f in (vm.get("status") or {}).get("fragments") or []}  # type: ignore[attr-defined]
        good = f"sum={expected}" in text
        print(
            f"\n  host-computed sum={expected}: guest "
            + ("agrees" if good else "DISAGREES")
            + f"; the guest's vCPUs ran on {len(nodes)} nodes ({', '.join(sorted(nodes))})"
        )
        return good and len(nodes) >= 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/demo", description=__doc__)
    parser.add_argument(
        "--example", type=Path, default=repo_root() / "examples" / "spanningvm-2node.yaml"
    )
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return Demo(args.example.resolve(), args.nodes, args.timeout).run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
