"""`spanvm` as a user runs it: a fresh process (`python -m spanvm.cli`), its output captured."""

import os
import subprocess
import sys
from pathlib import Path

from spanvm.devcluster.paths import repo_root


def cli_env(kubeconfig: Path | None = None) -> dict[str, str]:
    """The environment: this tree's package, and KUBECONFIG when given."""
    env = {**os.environ, "PYTHONPATH": str(repo_root() / "operator")}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


def spanvm(
    *args: str, timeout: float = 120, cwd: Path | None = None, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spanvm.cli", *args],
        cwd=cwd,
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
        env=cli_env(kubeconfig),
    )
