"""The guest console: bytes the guest writes to the doorbell, kept and streamed."""

import threading
import time
from collections.abc import Callable

CONSOLE_KEEP_BYTES = 1 << 20


class Console:
    """Collects console output from every vCPU (thread-safe) and forwards it to a sink."""

    def __init__(self, sink: Callable[[bytes], None] | None = None) -> None:
        self._sink = sink
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self.last_output = time.monotonic()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buffer += data
            if len(self._buffer) > CONSOLE_KEEP_BYTES:
                del self._buffer[: len(self._buffer) - CONSOLE_KEEP_BYTES]
            self.last_output = time.monotonic()
            if self._sink:
                self._sink(data)

    @property
    def text(self) -> str:
        """Everything kept so far, decoded leniently."""
        with self._lock:
            return self._buffer.decode(errors="replace")
