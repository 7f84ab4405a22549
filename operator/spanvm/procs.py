"""Processes this one may not have started: whether they run, whether they are frozen, and
tying a child's life to its parent's."""

import ctypes
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def pid_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat (R, S, D, T, t, Z, ...), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


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
    state = pid_state(pid)
    return state is not None and state != "Z"


def pid_frozen(pid: int) -> bool:
    """True if `pid` is stopped by a signal (SIGSTOP/SIGTSTP: state T) or a tracer (t)."""
    return pid_state(pid) in ("T", "t")


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when its parent ends (prctl(2)
    PR_SET_PDEATHSIG; strictly: when the parent *thread* that forked it ends, so a parent
    must start such children from a thread that lives as long as it does). Returns False if
    `parent_pid` is no longer the parent (it ended before the request took effect): the
    caller should then end at once. OSError if prctl fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    return os.getppid() == parent_pid
