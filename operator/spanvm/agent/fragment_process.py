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
from pathlib import Path
from typing import Any

from spanvm.agent.runner import CONSOLE, EXIT, LOG, PIDS, STATUS
from spanvm.api.phases import FragmentPhase
from spanvm.api.vmfragment import FabricCounters, VMFragmentStatus
from spanvm.contract import (
    Connected,
    Counters,
    Failed,
    Finished,
    FragmentEvent,
    Listening,
    Paused,
    Resumed,
    last_of,
    parse_events,
    pause_signal,
)
from spanvm.kube import JsonObject
from spanvm.procs import pid_alive
from spanvm.rfc3339 import format_time

STOP_REQUESTED = "stop-requested"
META = "fragment.json"  # which VMFragment this directory belongs to
TAIL_BYTES = 2048
STOP_GRACE = 8.0
POLL_INTERVAL = 0.1


def tail(path: Path, size: int = TAIL_BYTES) -> str:
    """The last `size` bytes of a file as text, starting at a line boundary."""
    return tail_and_size(path, size)[0]


def tail_and_size(path: Path, size: int = TAIL_BYTES) -> tuple[str, int]:
    """tail() and the file's size where that tail ends, read together (the console grows
    while it is read: `spanvm console --follow` needs both from the same moment)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read(end - f.tell())
    except FileNotFoundError:
        return "", 0
    text = data.decode(errors="replace")
    if end > size and "\n" in text:
        text = text.split("\n", 1)[1]
    return text, end


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
                    "startedAt": format_time(),
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

    def events(self) -> list[FragmentEvent]:
        try:
            return parse_events((self.dir / STATUS).read_text())
        except FileNotFoundError:
            return []

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
    def _signal(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def reap(self) -> None:
        if self._runner is not None:
            self._runner.poll()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def paused(self) -> bool:
        """Whether the fragment's last word on pausing was `paused`."""
        said = [e for e in self.events() if isinstance(e, (Paused, Resumed))]
        return bool(said) and isinstance(said[-1], Paused)

    def set_paused(self, paused: bool) -> None:
        """Ask a running fragment to pause or resume its vCPUs, until it says it has (a
        signal per pass: level-triggered, harmless when repeated)."""
        pid = self.pids().get("fragment")
        if pid and self.running() and not self.stop_requested() and self.paused() != paused:
            self._signal(pid, pause_signal(paused))

    # -- reporting ---------------------------------------------------------------------------
    def status(self, index: int) -> VMFragmentStatus:
        """VMFragment status as this process stands."""
        self.reap()
        events = self.events()
        listening = last_of(events, Listening)
        finished = last_of(events, Finished)
        # Paused is read before the console, so a pass that reports Paused does not carry a
        # size read before the fragment said it paused (bytes a vCPU was already writing, or
        # a peer's forwarded output, may still land just after).
        paused = self.paused()
        console, written = tail_and_size(self.dir / CONSOLE) if index == 0 else ("", 0)
        known = VMFragmentStatus(
            started_at=self.meta().get("startedAt"),
            pid=self.pids().get("fragment") or None,
            endpoint=listening.endpoint if listening else None,
            console_tail=console or None,
            console_bytes=written if console else None,
            counters=_api_counters(finished.counters) if finished else None,
        )
        ended = self.exit_status()
        if ended is None and self.running():
            connected = last_of(events, Connected) is not None
            if self.stop_requested():
                phase = FragmentPhase.STOPPING
            else:
                phase = FragmentPhase.RUNNING if connected else FragmentPhase.STARTING
            message = (
                "fragment VMM running; fabric connected"
                if connected
                else "fragment VMM started; connecting to peers"
            )
            if phase == FragmentPhase.RUNNING and paused:
                phase = FragmentPhase.PAUSED
                message = "vCPUs paused on request; the fabric keeps serving"
            return known.model_copy(update={"phase": phase, "message": message})
        phase, message, code = self._outcome(ended, finished, last_of(events, Failed))
        return known.model_copy(update={"phase": phase, "message": message, "exit_code": code})

    def _outcome(
        self,
        ended: dict[str, Any] | None,
        finished: Finished | None,
        failed: Failed | None,
    ) -> tuple[FragmentPhase, str, int | None]:
        """Phase, message and exit code of a fragment that has ended."""
        if self.stop_requested():
            return FragmentPhase.STOPPED, "stopped on request", None
        log_tail = tail(self.dir / LOG, 1024).strip()
        with_log = f"; log: {log_tail}" if log_tail else ""
        # The first cause first: what the fragment itself reported going wrong (a lost peer,
        # say) comes before how the process happened to end (killed by a signal on its way
        # out, a non-zero status).
        error = (failed.error if failed else None) or (finished.error if finished else None)
        if ended is None:
            why = "the fragment process disappeared without an exit status"
            return FragmentPhase.FAILED, why + with_log, None
        if ended.get("signal"):
            killed = f"fragment VMM killed by {ended['signal']}"
            why = f"{error} (then the {killed})" if error else killed + with_log
            return FragmentPhase.FAILED, why, None
        code = int(ended.get("exit_code") or 0)
        if error or finished is None:
            why = f"fragment VMM exited with status {code}: " + (
                error or log_tail or "no reason given"
            )
            return FragmentPhase.FAILED, why, code
        guest_code = finished.exit_code or 0
        if guest_code != 0:
            return FragmentPhase.FAILED, f"the guest exited with code {guest_code}", guest_code
        return FragmentPhase.SUCCEEDED, "the guest finished", 0


def _api_counters(counters: Counters) -> FabricCounters:
    """The counters VMFragment status reports (the contract's, less remote_faults: that one
    goes to the agent's metrics only)."""
    return FabricCounters(
        page_faults=counters.page_faults,
        pages_in=counters.pages_in,
        pages_out=counters.pages_out,
        invalidations=counters.invalidations,
    )


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
