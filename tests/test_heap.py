"""The fragment's heap thresholds (spanvm.fabric.heap): once applied, a message-sized buffer
(a 64-page grant, up to the 1 MiB frame limit) comes from the heap, not from its own mmap(2),
whose pages would each fault and be cleared again for every message (perf, streaming).

Each case runs in a fresh interpreter (mallopt is process-wide). Where a block came from is
read from glibc's chunk header, the size word just below the pointer malloc returned, whose
bit 0x2 is IS_MMAPPED (glibc malloc/malloc.c, "chunk representations"); a large `bytes`
object is such a pointer."""

import subprocess
import sys

PROBE = """
import ctypes, sys
from spanvm.fabric.heap import keep_message_buffers
applied = keep_message_buffers() if sys.argv[1] == "keep" else None
IS_MMAPPED = 0x2
mmapped = []
for size in (256 << 10, 1 << 20):  # a 64-page grant; the largest frame
    block = b"x" * size
    mmapped.append(bool(ctypes.c_size_t.from_address(id(block) - 8).value & IS_MMAPPED))
    del block
print(applied, *mmapped)
"""


def _probe(mode: str) -> list[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()


def test_message_buffers_come_from_the_heap_once_applied() -> None:
    assert _probe("default") == ["None", "True", "True"]  # glibc's defaults: own mmap each
    assert _probe("keep") == ["True", "False", "False"]
