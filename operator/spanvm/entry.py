"""The `spanvm` console script (and `python -m spanvm`).

Importing the CLI (pydantic, the API models, ctypes) takes about a second on a busy machine;
a stop signal in that second used to end in a KeyboardInterrupt traceback (SIGINT) or a silent
143 (SIGTERM). Until `spanvm.cli` installs its own handlers, SIGTERM/SIGINT/SIGHUP end the
process with one line and 128+N: nothing has started yet, so there is nothing to stop.
"""

import signal
import sys
from types import FrameType

from spanvm.stopsignals import STOP_SIGNALS  # light: signal and typing only


def _stopped_while_starting(signum: int, _frame: FrameType | None) -> None:
    sys.stderr.write(f"spanvm: stopped by {signal.Signals(signum).name}\n")
    raise SystemExit(128 + signum)


def main() -> int:
    """Install the start-up handlers, then run `spanvm.cli.main`."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stopped_while_starting)
    from spanvm.cli import main as cli_main  # noqa: PLC0415 - after the handlers, on purpose

    return cli_main()
