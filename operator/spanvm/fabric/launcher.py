"""Runs one guest across several local fragment processes (`spanvm run --fragments N`).

Each fragment is a `spanvm fragment` process; with `netns=True` each runs in a network
namespace of its own, joined to the others through a bridge in a further namespace, so
fabric traffic really crosses an interface. Fragments start in index order: each learns the
endpoints of the lower-index ones, which it connects to.

Stopping: fragments run in a process group of their own (the terminal's Ctrl-C reaches only
the launcher, which decides) and die with the launcher (each asks the kernel for SIGKILL when
its parent ends: `spanvm fragment --parent-pid`). `LocalVm.request_stop` (on SIGTERM, SIGINT or
SIGHUP to `spanvm run`) sends SIGTERM to every fragment; once a stop was requested, or once any
fragment has ended, the others get STOP_GRACE seconds to end by themselves, then SIGKILL, and
the launcher names each fragment it had to kill and whether it was frozen (SIGSTOPped).
"""

import contextlib
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

from spanvm.contract import (
    CpuFeatures,
    FragmentEvent,
    Listening,
    MultibootKernel,
    fragment_command,
    fragment_config,
    parse_event,
    parse_events,
)
from spanvm.fabric.homes import plan_homes
from spanvm.fabric.netns import NamespaceNet
from spanvm.procs import pid_frozen, pid_state
from spanvm.shares import memory_shares
from spanvm.vmm.errors import EXIT_VM_ERROR

START_TIMEOUT = 60.0
# Seconds the fragments get to end by themselves once a stop was requested or any fragment
# ended, before SIGKILL. Above a fragment's own watchdog (STOP_GRACE_SECONDS, 5 s: a fragment
# whose vCPUs do not stop exits by itself), so only a frozen or wedged fragment is killed.
STOP_GRACE = 6.0
KILL_WAIT = 10.0  # seconds a SIGKILLed fragment may take to go (its VM's teardown)
POLL_INTERVAL = 0.05


class LaunchError(RuntimeError):
    """A fragment did not start."""


def split_vcpus(vcpus: int, fragments: int) -> list[list[int]]:
    """Contiguous, as even as possible: 5 over 2 -> [0,1,2], [3,4]."""
    if not 1 <= fragments <= vcpus:
        raise ValueError(f"--fragments must be between 1 and --vcpus ({vcpus}), got {fragments}")
    out, start = [], 0
    for i in range(fragments):
        size = vcpus // fragments + (1 if i < vcpus % fragments else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


@dataclass
class RunningFragment:
    """One launched fragment process."""

    index: int
    process: subprocess.Popen[bytes]
    status: IO[str]
    endpoint: str = ""
    events: list[FragmentEvent] = field(default_factory=list)

    def read_status(self, timeout: float) -> FragmentEvent:
        """The next status line (blocking up to timeout)."""
        ready, _, _ = select.select([self.status], [], [], timeout)
        if not ready:
            raise LaunchError(f"fragment {self.index} said nothing for {timeout:.0f}s")
        line = self.status.readline()
        if not line:
            try:
                code: int | str | None = self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = "unknown: still running"
            raise LaunchError(f"fragment {self.index} exited during start-up (status {code})")
        event = parse_event(line)
        self.events.append(event)
        return event


@dataclass
class LocalVm:
    """A guest running as several local fragment processes."""

    fragments: list[RunningFragment]
    stop_reason: str | None = None  # why a stop was requested (e.g. "stopped by SIGTERM")
    killed: list[str] = field(default_factory=list)  # what wait() said about fragments it killed
    _grace_from: float | None = None

    def request_stop(self, reason: str) -> bool:
        """Ask every fragment to stop (SIGTERM, highest index first, so the others already
        know they are stopping when fragment 0's last word arrives). Safe in a signal handler
        (sends signals, prints nothing); idempotent. True: a stop is under way."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self._grace_from = time.monotonic()
            for f in reversed(self.fragments):
                if f.process.poll() is None:
                    f.process.send_signal(signal.SIGTERM)
        return True

    def wait(self, timeout: float | None = None) -> int:
        """Wait for every fragment; fragment 0's exit status, or EXIT_VM_ERROR if any failed.

        Once a stop was requested or any fragment ended, the others have STOP_GRACE seconds to
        end; then they are killed, with one line each on stderr. `timeout` (seconds) raises
        subprocess.TimeoutExpired and leaves the fragments running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        killed: set[int] = set()
        while True:
            codes = [f.process.poll() for f in self.fragments]
            if all(code is not None for code in codes):
                break
            now = time.monotonic()
            if self._grace_from is None and any(code is not None for code in codes):
                self._grace_from = now
            if self._grace_from is not None and now - self._grace_from > STOP_GRACE:
                if not killed:
                    killed = self._kill_stragglers()
                elif now - self._grace_from > STOP_GRACE + KILL_WAIT:
                    self._abandon_unkillable()
                    return EXIT_VM_ERROR
            if deadline is not None and now > deadline:
                raise subprocess.TimeoutExpired(f"fragments of {self.fragments}", timeout or 0)
            time.sleep(POLL_INTERVAL)
        final = [f.process.wait() for f in self.fragments]
        for f in self.fragments:
            f.events += parse_events(f.status.read())
        for f, code in zip(self.fragments, final, strict=True):
            if code < 0 and f.index not in killed:  # a signal: the fragment could not say why
                print(
                    f"spanvm: fragment {f.index} died of {signal.Signals(-code).name}",
                    file=sys.stderr,
                )
        if any(code != 0 for code in final[1:]) or final[0] < 0:
            return EXIT_VM_ERROR
        return final[0]

    def _kill_stragglers(self) -> set[int]:
        """SIGKILL every fragment still running after the grace period, saying which."""
        killed = set()
        for f in self.fragments:
            if f.process.poll() is not None:
                continue
            frozen = pid_frozen(f.process.pid)
            f.process.kill()
            killed.add(f.index)
            line = (
                f"spanvm: fragment {f.index} (pid {f.process.pid})"
                f"{' was frozen (SIGSTOPped) and' if frozen else ''} did not end within"
                f" {STOP_GRACE:g}s after"
                f" {'it was asked to stop' if self.stop_reason else 'another fragment ended'};"
                " killed it"
            )
            self.killed.append(line)
            print(line, file=sys.stderr)
        return killed

    def _abandon_unkillable(self) -> None:
        for f in self.fragments:
            if f.process.poll() is None:
                print(
                    f"spanvm: fragment {f.index} (pid {f.process.pid}) did not die within"
                    f" {KILL_WAIT:g}s of SIGKILL (state {pid_state(f.process.pid)}); leaving it",
                    file=sys.stderr,
                )

    def kill(self) -> None:
        """SIGKILL every fragment (and anything left in their process group) and reap them."""
        leader = self.fragments[0].process if self.fragments else None
        if leader is not None and leader.returncode is None:  # not reaped: the group is ours
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(leader.pid, signal.SIGKILL)
        for f in self.fragments:
            if f.process.poll() is None:
                f.process.kill()
        for f in self.fragments:
            with contextlib.suppress(subprocess.TimeoutExpired):
                f.process.wait(KILL_WAIT)


@contextmanager
def launch(  # noqa: PLR0917 - mirrors `spanvm run`'s options
    payload: str,
    vcpus: int,
    memory: int,
    fragments: int,
    arg: int = 0,
    idle_timeout: float | None = None,
    netns: bool = False,
    home_policy: str = "proportional",
    readahead: int | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    multiboot: MultibootKernel | None = None,
    cpu: CpuFeatures | None = None,
) -> Iterator[LocalVm]:
    """Start the fragments (and namespaces); yields the running VM; always cleans up.
    `multiboot` boots that kernel (a platform guest: coherent memory from 0) instead of
    `payload`."""
    split = split_vcpus(vcpus, fragments)
    shares = memory_shares(memory, [len(s) for s in split])
    assert shares is not None  # no room limit: always fits
    plan = plan_homes(memory, shares, home_policy, platform=multiboot is not None)
    homes = [(h.start, h.end, h.index) for h in plan]
    places = [index for index, ids in enumerate(split) for _ in ids]
    secret = secrets.token_hex(32)
    net = NamespaceNet(fragments) if netns else None
    running: list[RunningFragment] = []
    try:
        if net is not None:
            net.create()
        endpoints: dict[int, str] = {}
        for index, vcpu_ids in enumerate(split):
            config = fragment_config(
                index=index,
                vcpu_ids=vcpu_ids,
                vcpu_count=vcpus,
                fragment_count=fragments,
                memory=memory,
                payload=payload,
                arg=arg,
                homes=homes,
                peers=endpoints,
                secret=secret,
                listen_host=net.address(index) if net else "127.0.0.1",
                node_name=net.namespace(index) if net else f"local-{index}",
                idle_timeout=idle_timeout,
                readahead=readahead,
                multiboot=multiboot,
                vcpu_fragments=places,
                cpu=cpu,
            )
            read_fd, write_fd = os.pipe()
            command = fragment_command(write_fd, parent_pid=os.getpid())
            if net is not None:
                command = ["ip", "netns", "exec", net.namespace(index), *command]
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                stdout=stdout if index == 0 else subprocess.DEVNULL,
                stderr=stderr,
                # One group for every fragment, led by fragment 0 (see LocalVm.kill).
                process_group=running[0].process.pid if running else 0,
            )
            os.close(write_fd)
            assert process.stdin is not None
            process.stdin.write(config.to_json())
            process.stdin.close()
            fragment = RunningFragment(index, process, os.fdopen(read_fd, "r"))
            running.append(fragment)
            event = fragment.read_status(START_TIMEOUT)
            if not isinstance(event, Listening):
                raise LaunchError(f"fragment {index}: {event}")
            fragment.endpoint = endpoints[index] = event.endpoint
        yield LocalVm(running)
    finally:
        LocalVm(running).kill()
        for f in running:
            f.status.close()
        if net is not None:
            net.destroy()
