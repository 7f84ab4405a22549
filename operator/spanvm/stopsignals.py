"""Stop requests by signal (SIGTERM, SIGINT, SIGHUP) for `spanvm run` and `spanvm fragment`.

While installed (a context manager), each of these signals calls `action(reason)`, which
starts an orderly stop and returns True; if there is no action yet, or it returns False
(nothing is running that could stop), the handler raises `Interrupted` instead, which aborts
start-up. Callers end with `signal_status(received)` (128 + the signal's number). Handlers run
on the main thread, between bytecodes, so an action must only set flags, kick threads and send
signals; it must not print (the main thread may be inside a write to the same stream).
"""

import signal
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(Exception):  # noqa: N818 - a stop request, not an error
    """A stop signal arrived while there was nothing to stop in order (start-up)."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(f"stopped by {sig.name}")
        self.signal = sig


class StopSignals:
    """Route SIGTERM/SIGINT/SIGHUP to a stop action while installed."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None  # the first stop signal, if any
        self.action: Callable[[str], bool] | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:
            return  # already stopping: a second Ctrl-C must not cut the cleanup short
        self.received = sig
        if self.action is None or not self.action(f"stopped by {sig.name}"):
            raise Interrupted(sig)

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
