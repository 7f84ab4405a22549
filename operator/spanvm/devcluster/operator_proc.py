"""The operator as a local process (what its Deployment runs), for the demo and the tests."""

import os
import signal
import subprocess
import sys
from pathlib import Path


def operator_command(
    kubeconfig: Path,
    *,
    system_namespace: str,
    lease_name: str = "spanvm-operator",
    namespaces: tuple[str, ...] = (),
    timer_interval: float = 1.0,
    deletion_grace: float = 10.0,
    node_loss_grace: float = 3.0,
    restart_backoff: float = 10.0,
    lease_duration: int = 6,
    metrics_port: int | None = None,
    health_port: int | None = None,
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "spanvm.cli",
        "operator",
        "--kubeconfig",
        str(kubeconfig),
        "--system-namespace",
        system_namespace,
        "--lease-name",
        lease_name,
        "--lease-duration",
        str(lease_duration),
        "--timer-interval",
        str(timer_interval),
        "--deletion-grace",
        str(deletion_grace),
        "--node-loss-grace",
        str(node_loss_grace),
        "--restart-backoff",
        str(restart_backoff),
    ]
    for ns in namespaces:
        command += ["--namespace", ns]
    if metrics_port is not None:
        command += ["--metrics-port", str(metrics_port)]
    if health_port is not None:
        command += ["--health-port", str(health_port)]
    return command


def start(
    command: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a process logging to log_path (appended)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )


def stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
