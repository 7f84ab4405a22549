"""Shared fixtures: one real control plane for the whole test session, started on demand."""

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spanvm.devcluster import kvm_unit_tests
from spanvm.devcluster.controlplane import ControlPlane, ensure_tools
from spanvm.devcluster.paths import kubectl, repo_root

REPO = repo_root()


@dataclass
class Cluster:
    """A running control plane and a kubectl bound to it."""

    plane: ControlPlane

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        result = subprocess.run(
            [kubectl(), *args],
            input=stdin,
            capture_output=True,
            check=False,
            text=True,
            env=env,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """etcd + kube-apiserver + kube-controller-manager, up for the session, stopped after."""
    ensure_tools()
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    plane.up()
    try:
        yield Cluster(plane)
    finally:
        plane.down()


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    """The cluster with spanvm's CRDs installed and Established."""
    cluster.kubectl("apply", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    return cluster


@pytest.fixture(scope="session")
def kut_build() -> Path:
    """kvm-unit-tests built from ../shared/kvm-unit-tests (once per machine, cached)."""
    return kvm_unit_tests.build(log=False)


@pytest.fixture(scope="session")
def kut_dummy(kut_build: Path) -> Path:
    return kut_build / "x86" / "dummy.flat"
