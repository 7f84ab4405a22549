"""Supervisor of one fragment process, started by the agent in a session of its own.

`python -m spanvm.agent.runner DIR` reads the fragment's configuration (with the VM's secret)
on stdin and hands it to `spanvm fragment` through a pipe, never a command line or a file.
It records both pids in DIR/pids.json, sends the fragment's status lines to DIR/status.jsonl,
its console to DIR/console.log and its log to DIR/fragment.log, and when the fragment ends
writes how it ended to DIR/exit.json. It outlives an agent restart, which is how a new agent
learns the exit status of a fragment it did not start. The fragment dies with the runner
(`--parent-pid`: PR_SET_PDEATHSIG), so a runner killed outright leaves no orphaned guest.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from spanvm.contract import fragment_command

PIDS, STATUS, CONSOLE, LOG, EXIT = (
    "pids.json",
    "status.jsonl",
    "console.log",
    "fragment.log",
    "exit.json",
)


def _write_atomic(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def main(directory: str) -> int:
    state = Path(directory)
    config = sys.stdin.buffer.read()
    status_fd = os.open(state / STATUS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with (state / CONSOLE).open("ab") as console, (state / LOG).open("ab") as log:
        child = subprocess.Popen(
            fragment_command(status_fd, parent_pid=os.getpid()),
            stdin=subprocess.PIPE,
            stdout=console,
            stderr=log,
            pass_fds=(status_fd,),
        )
    os.close(status_fd)
    _write_atomic(state / PIDS, {"runner": os.getpid(), "fragment": child.pid})
    # A stop request for the runner is a stop request for the fragment.
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    assert child.stdin is not None
    try:
        child.stdin.write(config)
        child.stdin.close()
    except BrokenPipeError:
        pass
    code = child.wait()
    result: dict[str, object] = {"exit_code": code}
    if code < 0:
        result = {"exit_code": None, "signal": signal.Signals(-code).name}
    _write_atomic(state / EXIT, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
