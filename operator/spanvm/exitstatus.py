"""The exit statuses of `spanvm run` (and `spanvm fragment`), in one place.

| status | meaning |
| --- | --- |
| 0-255 | the guest's exit code (it fits) |
| 2 | bad arguments |
| 70 | the VM stopped on an error (`EXIT_VM_ERROR`) |
| 124 | `--timeout`: the guest was idle that long |
| 125 | the guest's exit code is above 255; the full code is printed on stderr |
| 128+N | stopped by signal N (SIGHUP 129, SIGINT 130, SIGTERM 143) |

A guest may itself exit with 2, 70, 124 or 125: stderr then says nothing, which is how to
tell them apart.
"""

import signal

from spanvm.vmm.errors import EXIT_VM_ERROR

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_CODE_TOO_LARGE = 125
MAX_STATUS = 255

__all__ = [
    "EXIT_CODE_TOO_LARGE",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "EXIT_VM_ERROR",
    "guest_status",
    "signal_status",
    "too_large_message",
]


def guest_status(code: int) -> int:
    """The process exit status for a guest exit code (0..2**32-1): the code itself if it fits
    in 0..255, else EXIT_CODE_TOO_LARGE (never a wrapped value: 256 must not look like 0)."""
    return code if 0 <= code <= MAX_STATUS else EXIT_CODE_TOO_LARGE


def too_large_message(code: int) -> str | None:
    """The stderr line for a guest exit code that does not fit, or None if it fits."""
    if guest_status(code) == code:
        return None
    return (
        f"spanvm: the guest exited with code {code} ({code:#x}), which does not fit in an exit"
        f" status; exiting with {EXIT_CODE_TOO_LARGE}"
    )


def signal_status(sig: signal.Signals) -> int:
    """128 + the signal's number, as a shell reports a process ended by it."""
    return 128 + int(sig)
