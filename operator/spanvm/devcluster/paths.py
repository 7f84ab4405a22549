"""The dev cluster's binaries, under the project's cache (`spanvm.paths`)."""

from pathlib import Path

from spanvm.paths import cache_dir, repo_root

__all__ = ["bin_dir", "cache_dir", "kubectl", "repo_root"]  # the last two for its callers


def bin_dir() -> Path:
    """The pinned upstream binaries built by hack/build-tools."""
    return cache_dir() / "bin"


def kubectl() -> str:
    """Path of the kubectl built with the control plane (falls back to one on PATH)."""
    built = bin_dir() / "kubectl"
    return str(built) if built.exists() else "kubectl"
