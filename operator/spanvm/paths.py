"""Where the project keeps what it builds and runs: the `.cache/` folder (git-ignored).

A leaf module: the payload build and the dev cluster both read it, neither through the other.
"""

import os
from pathlib import Path


def repo_root() -> Path:
    """The source checkout this package runs from (operator/spanvm/... -> repo root)."""
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """`$SPANVM_CACHE_DIR`, else `.cache/` of the checkout, else `~/.cache/spanvm`."""
    env = os.environ.get("SPANVM_CACHE_DIR")
    if env:
        return Path(env)
    root = repo_root()
    if (root / "pyproject.toml").exists():
        return root / ".cache"
    return Path.home() / ".cache" / "spanvm"
