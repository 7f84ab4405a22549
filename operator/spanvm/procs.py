"""Whether a process is running, for processes this one may not have started."""

import os
from pathlib import Path


def pid_alive(pid: int | None) -> bool:
    """True if `pid` exists and is not a zombie (exited, waiting to be reaped)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
