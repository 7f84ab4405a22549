"""One fragment process as the agent manages it: started through the runner, found again
after an agent restart from its state directory, stopped on request, and described as
VMFragment status (phase, endpoint, pid, start time, counters, exit reason, log tails)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spanvm.agent.runner import CONSOLE, EXIT, LOG, PIDS, STATUS
from spanvm.kube import JsonObject
from spanvm.procs import pid_alive

STOP_REQUESTED = "stop-requested"
META = "fragment.json"  # which VMFragment this directory belongs to
TAIL_BYTES = 2048
STOP_GRACE = 8.0
POLL_INTERVAL = 0.1


def tail(path: Path, size: int = TAIL_BYTES) -> str:
    """The last `size` bytes of a file as text, starting at a line boundary."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode(errors="replace")
    if end > size and "\n" in text:
        text = text.split("\n", 1)[1]
    return text


class FragmentProcess:
    """The process (and state directory) of one VMFragment on this node."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._runner: subprocess.Popen[bytes] | None = None  # set when this agent started it
        self._stop_sent_at: float | None = None

    @property
    def uid(self) -> str:
        return str(self.meta().get("uid", ""))

    def meta(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.dir / META).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data

    @classmethod
    def launch(cls, directory: Path, fragment: JsonObject, config_json: bytes) -> "FragmentProcess":
        """Start the runner (its own session: it outlives the agent) with the config on stdin."""
        directory.mkdir(parents=True, exist_ok=True)
        meta = fragment["metadata"]
        (directory / META).write_text(
            json.dumps(
                {
                    "uid": meta["uid"],
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "startedAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            )
        )
        proc = cls(directory)
        with (directory / "runner.log").open("ab") as runner_log:
            runner = subprocess.Popen(
                [sys.executable, "-m", "spanvm.agent.runner", str(directory)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=runner_log,
                start_new_session=True,
            )
        assert runner.stdin is not None
        runner.stdin.write(config_json)
        runner.stdin.close()
        proc._runner = runner
        return proc

    # -- what is known -----------------------------------------------------------------------
    def pids(self) -> dict[str, int]:
        try:
            data: dict[str, int] = json.loads((self.dir / PIDS).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data

    def events(self) -> list[dict[str, Any]]:
        try:
            lines = (self.dir / STATUS).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written
        return out

    def exit_status(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.dir / EXIT).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data

    def running(self) -> bool:
        if self._runner is not None and self._runner.poll() is None:
            return True
        return self.exit_status() is None and pid_alive(self.pids().get("runner"))

    def stop_requested(self) -> bool:
        return (self.dir / STOP_REQUESTED).exists()

    # -- acting ------------------------------------------------------------------------------
    def stop(self) -> None:
        """SIGTERM the fragment, SIGKILL it after a grace period; remembered across restarts."""
        (self.dir / STOP_REQUESTED).touch()
        pid = self.pids().get("fragment")
        if not self.running() or not pid:
            return
        now = time.monotonic()
        if self._stop_sent_at is None:
            self._stop_sent_at = now
            self._signal(pid, signal.SIGTERM)
        elif now - self._stop_sent_at > STOP_GRACE:
            self._signal(pid, signal.SIGKILL)

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def reap(self) -> None:
        if self._runner is not None:
            self._runner.poll()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- reporting ---------------------------------------------------------------------------
    def status(self, index: int) -> JsonObject:
        """VMFragment status as this process stands."""
        self.reap()
        events = self.events()
        by_kind = {e.get("event"): e for e in events}
        pids = self.pids()
        out: JsonObject = {"startedAt": self.meta().get("startedAt")}
        if pids.get("fragment"):
            out["pid"] = pids["fragment"]
        if "listening" in by_kind:
            out["endpoint"] = by_kind["listening"]["endpoint"]
        if index == 0:
            console = tail(self.dir / CONSOLE)
            if console:
                out["consoleTail"] = console
        finished = by_kind.get("finished")
        if finished:
            out["counters"] = {
                "pageFaults": int(finished.get("faults") or 0),
                "pagesIn": int(finished.get("pages_in") or 0),
                "pagesOut": int(finished.get("pages_out") or 0),
            }
        ended = self.exit_status()
        if ended is None and self.running():
            connected = "connected" in by_kind
            out["phase"] = (
                "Stopping" if self.stop_requested() else ("Running" if connected else "Starting")
            )
            out["message"] = (
                "fragment VMM running; fabric connected"
                if connected
                else "fragment VMM started; connecting to peers"
            )
            return out
        out.update(self._outcome(ended, finished, by_kind.get("failed")))
        return out

    def _outcome(
        self,
        ended: dict[str, Any] | None,
        finished: dict[str, Any] | None,
        failed: dict[str, Any] | None,
    ) -> JsonObject:
        if self.stop_requested():
            return {"phase": "Stopped", "message": "stopped on request"}
        log_tail = tail(self.dir / LOG, 1024).strip()
        # The first cause first: what the fragment itself reported going wrong (a lost peer,
        # say) comes before how the process happened to end (killed by a signal on its way
        # out, a non-zero status).
        error = (failed or {}).get("error") or (finished or {}).get("error")
        if ended is None:
            return {
                "phase": "Failed",
                "message": "the fragment process disappeared without an exit status"
                + (f"; log: {log_tail}" if log_tail else ""),
            }
        if ended.get("signal"):
            killed = f"fragment VMM killed by {ended['signal']}"
            return {
                "phase": "Failed",
                "message": f"{error} (then the {killed})"
                if error
                else killed + (f"; log: {log_tail}" if log_tail else ""),
            }
        code = int(ended.get("exit_code") or 0)
        if error or finished is None:
            return {
                "phase": "Failed",
                "exitCode": code,
                "message": f"fragment VMM exited with status {code}: "
                + (error or log_tail or "no reason given"),
            }
        guest_code = int(finished.get("exit_code") or 0)
        if guest_code != 0:
            return {
                "phase": "Failed",
                "exitCode": guest_code,
                "message": f"the guest exited with code {guest_code}",
            }
        return {"phase": "Succeeded", "exitCode": 0, "message": "the guest finished"}


def stop_all(processes: list[FragmentProcess], grace: float = STOP_GRACE) -> list[FragmentProcess]:
    """Stop every running fragment (SIGTERM at once; `FragmentProcess.stop` SIGKILLs one still
    running STOP_GRACE seconds after its first SIGTERM) and wait for their runners to record
    how they ended: what an agent started with `--stop-fragments-on-exit` does on its way out.
    Gives up `grace` + 2 s from now; returns those still running then (normally none)."""
    deadline = time.monotonic() + grace + 2.0
    left = [p for p in processes if p.running()]
    while left and time.monotonic() < deadline:
        for proc in left:
            proc.stop()
        time.sleep(POLL_INTERVAL)
        for proc in left:
            proc.reap()
        left = [p for p in left if p.running()]
    return left
