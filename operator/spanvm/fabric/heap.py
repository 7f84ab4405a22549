"""glibc heap settings for a fragment process (mallopt(3)).

The fabric allocates and frees a buffer per message: a batched grant or DATA reply is up to
64 pages (256 KiB), received into a fresh `bytes`, and a home copies pages that move out into
one. glibc serves blocks over `M_MMAP_THRESHOLD` (128 KiB at start) with mmap(2) and gives
freed heap tops back to the kernel over `M_TRIM_THRESHOLD`; either way the next buffer is
fresh memory, and every one of its pages costs a page fault and a clear. Raising both keeps
those buffers on the heap and their pages mapped: while streaming, the requesting reader
thread took 149,067 minor faults in 2 s without and 28,673 with (`/proc/<pid>/task/<tid>/stat`),
and the page-fault and clear_page samples left its perf profile (docs/fabric.md).
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger("spanvm.fragment")

# mallopt(3) parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20  # over the largest frame (wire.MAX_PAYLOAD, 1 MiB) and its header
TRIM_THRESHOLD = 64 << 20  # freed heap each malloc arena keeps: small beside guest RAM


def keep_message_buffers() -> bool:
    """Apply the thresholds above to this process; False (logged) where the C library has no
    mallopt (not glibc) or refuses a value, which only costs speed."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        log.info("no mallopt in this C library: message buffers are fresh memory each time")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done: bool = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if not done:
        log.info("mallopt refused the fabric's heap thresholds")
    return done
