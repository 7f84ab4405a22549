"""Where the project keeps what it builds and runs: the `.cache/` folder (git-ignored)."""

import os
from pathlib import Path


def repo_root() -> Path:
    """The source checkout this package runs from (operator/spanvm/... -> repo root)."""
    return Path(__file__).resolve().parents[3]


def cache_dir() -> Path:
    """`$SPANVM_CACHE_DIR`, else `.cache/` of the checkout, else `~/.cache/spanvm`."""
    env = os.environ.get("SPANVM_CACHE_DIR")
    if env:
        return Path(env)
    root = repo_root()
    if (root / "pyproject.toml").exists():
        return root / ".cache"
    return Path.home() / ".cache" / "spanvm"


def bin_dir() -> Path:
    """The pinned upstream binaries built by hack/build-tools."""
    return cache_dir() / "bin"


def kubectl() -> str:
    """Path of the kubectl built with the control plane (falls back to one on PATH)."""
    built = bin_dir() / "kubectl"
    return str(built) if built.exists() else "kubectl"
