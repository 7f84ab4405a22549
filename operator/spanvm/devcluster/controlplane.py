"""Starts, checks and stops the local control plane: etcd, kube-apiserver, kube-controller-manager.

All three are the pinned upstream binaries from hack/build-tools, listening on loopback ports
chosen at start-up. State (certificates, etcd data, logs, pids, the admin kubeconfig) lives in
one folder, `.cache/cluster/` by default. `python -m spanvm.devcluster.controlplane up|down|status`
(hack/control-plane) drives it by hand; the pytest session fixture drives it for the tests.
"""

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from spanvm.devcluster.certs import ensure_certs
from spanvm.devcluster.paths import bin_dir, cache_dir, repo_root
from spanvm.procs import pid_alive

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")
# The controllers a cluster without kubelets needs: owner-reference garbage collection,
# namespace deletion, service accounts and their tokens, aggregated cluster roles.
CONTROLLERS = ",".join(
    (
        "garbage-collector-controller",
        "namespace-controller",
        "serviceaccount-controller",
        "serviceaccount-token-controller",
        "clusterrole-aggregation-controller",
        "root-ca-certificate-publisher-controller",
    )
)


class ControlPlaneError(RuntimeError):
    """The control plane could not be started or reached; the message carries the log tail."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, or a note that it is missing."""
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Ports:
    """The loopback ports one running control plane uses."""

    etcd_client: int
    etcd_peer: int
    apiserver: int

    @classmethod
    def pick(cls) -> "Ports":
        return cls(_free_port(), _free_port(), _free_port())


class ControlPlane:
    """One local control plane rooted at a state folder."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = (state_dir or cache_dir() / "cluster").resolve()
        self.certs = self.state_dir / "certs"
        self.logs = self.state_dir / "logs"
        self.pids = self.state_dir / "pids"
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.ports_file = self.state_dir / "ports.json"

    # -- processes ---------------------------------------------------------------------------
    def _pid(self, component: str) -> int | None:
        path = self.pids / f"{component}.pid"
        if not path.exists():
            return None
        pid = int(path.read_text().strip() or 0)
        return pid if pid and pid_alive(pid) else None

    def _start(self, component: str, args: list[str]) -> None:
        binary = bin_dir() / component
        if not binary.exists():
            raise ControlPlaneError(f"{binary} is missing: run hack/build-tools (make tools) first")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{component}.log").open("ab") as log:
            proc = subprocess.Popen(
                [str(binary), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        (self.pids / f"{component}.pid").write_text(str(proc.pid))

    def running(self) -> dict[str, int | None]:
        """Pid of each component, None where it is not running."""
        return {c: self._pid(c) for c in COMPONENTS}

    @property
    def ports(self) -> Ports:
        return Ports(**json.loads(self.ports_file.read_text()))

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self, timeout: float = 120.0) -> None:
        """Start whatever is not running and wait for /readyz; idempotent. On failure nothing
        is left running and the error carries the failing component's log tail."""
        pids = self.running()
        if all(pids.values()) and self.ready():
            return
        if any(pids.values()):
            self.down()
        try:
            self._start_all(timeout)
        except BaseException:
            self.down()
            raise

    def _start_all(self, timeout: float) -> None:
        ensure_certs(self.certs)
        ports = Ports.pick()
        self.ports_file.write_text(json.dumps(ports.__dict__))
        self._write_kubeconfig()
        c = self.certs
        etcd_url = f"http://127.0.0.1:{ports.etcd_client}"
        self._start(
            "etcd",
            [
                "--name=spanvm-local",
                f"--data-dir={self.state_dir / 'etcd-data'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
                f"--initial-cluster=spanvm-local=http://127.0.0.1:{ports.etcd_peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        self._start(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports.apiserver}",
                f"--cert-dir={c}",
                f"--tls-cert-file={c / 'apiserver.crt'}",
                f"--tls-private-key-file={c / 'apiserver.key'}",
                f"--client-ca-file={c / 'ca.crt'}",
                f"--service-account-issuer=https://127.0.0.1:{ports.apiserver}",
                f"--service-account-key-file={c / 'sa.pub'}",
                f"--service-account-signing-key-file={c / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait_ready(timeout)
        self._start(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--leader-elect=false",
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={c / 'sa.key'}",
                f"--root-ca-file={c / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--v=1",
            ],
        )
        time.sleep(0.5)
        if not self._pid("kube-controller-manager"):
            raise ControlPlaneError(
                "kube-controller-manager exited at start:\n"
                + log_tail(self.logs / "kube-controller-manager.log")
            )

    def down(self, timeout: float = 20.0) -> None:
        """Stop every component (SIGTERM, then SIGKILL after the timeout)."""
        for component in reversed(COMPONENTS):
            pid = self._pid(component)
            if pid:
                os.killpg(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if pid_alive(pid):
                    os.killpg(pid, signal.SIGKILL)
            (self.pids / f"{component}.pid").unlink(missing_ok=True)

    def purge(self) -> None:
        """Stop and delete all state (certificates, etcd data, logs)."""
        self.down()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- health ------------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        ctx.load_cert_chain(str(self.certs / "admin.crt"), str(self.certs / "admin.key"))
        return ctx

    def ready(self) -> bool:
        """Whether /readyz answers ok."""
        if not self.ports_file.exists():
            return False
        try:
            with urllib.request.urlopen(
                f"{self.server}/readyz", context=self._ssl_context(), timeout=5
            ) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for component in ("etcd", "kube-apiserver"):
                if not self._pid(component):
                    raise ControlPlaneError(
                        f"{component} exited during start-up; log tail:\n"
                        + log_tail(self.logs / f"{component}.log")
                    )
            if self.ready():
                return
            time.sleep(0.3)
        raise ControlPlaneError(
            f"kube-apiserver not ready after {timeout:.0f}s; log tail:\n"
            + log_tail(self.logs / "kube-apiserver.log")
        )

    def _write_kubeconfig(self) -> None:
        def b64(name: str) -> str:
            return base64.b64encode((self.certs / name).read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "spanvm-local",
                    "cluster": {"server": self.server, "certificate-authority-data": b64("ca.crt")},
                }
            ],
            "users": [
                {
                    "name": "spanvm-admin",
                    "user": {
                        "client-certificate-data": b64("admin.crt"),
                        "client-key-data": b64("admin.key"),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "spanvm-local",
                    "context": {"cluster": "spanvm-local", "user": "spanvm-admin"},
                }
            ],
            "current-context": "spanvm-local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)


def ensure_tools() -> None:
    """Build the pinned binaries if they are missing (hack/build-tools is a no-op when cached)."""
    script = repo_root() / "hack" / "build-tools"
    if script.exists():
        subprocess.run([str(script)], check=True)
    elif not (bin_dir() / "kube-apiserver").exists():
        raise ControlPlaneError(f"no control-plane binaries in {bin_dir()} and no hack/build-tools")


def main(argv: list[str] | None = None) -> int:
    """Command line: up | down | status | purge | kubeconfig."""
    parser = argparse.ArgumentParser(prog="hack/control-plane", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "purge", "kubeconfig"])
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    cp = ControlPlane(args.state_dir)
    try:
        if args.command == "up":
            ensure_tools()
            started = time.monotonic()
            cp.up()
            print(f"control plane ready in {time.monotonic() - started:.1f}s at {cp.server}")
            print(f"export KUBECONFIG={cp.kubeconfig}")
        elif args.command == "down":
            cp.down()
            print("control plane stopped")
        elif args.command == "purge":
            cp.purge()
            print(f"control plane stopped and {cp.state_dir} deleted")
        elif args.command == "kubeconfig":
            print(cp.kubeconfig)
        else:
            for component, pid in cp.running().items():
                print(f"{component:26} {'running, pid ' + str(pid) if pid else 'stopped'}")
            print(f"{'readyz':26} {'ok' if cp.ready() else 'not ready'}")
            return 0 if cp.ready() else 1
    except ControlPlaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
