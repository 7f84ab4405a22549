"""Runs one guest across several local fragment processes (`spanvm run --fragments N`).

Each fragment is a `spanvm fragment` process; with `netns=True` each runs in a network
namespace of its own, joined to the others through a bridge in a further namespace, so
fabric traffic really crosses an interface. Fragments start in index order: each learns the
endpoints of the lower-index ones, which it connects to.
"""

import json
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
from typing import IO, Any

from spanvm.fabric.coherence import READAHEAD
from spanvm.fabric.fragment import FragmentConfig
from spanvm.fabric.homes import plan_homes
from spanvm.fabric.netns import NamespaceNet
from spanvm.vmm.machine import EXIT_VM_ERROR

START_TIMEOUT = 60.0


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
    events: list[dict[str, Any]] = field(default_factory=list)

    def read_status(self, timeout: float) -> dict[str, Any]:
        """The next status line (blocking up to timeout)."""
        ready, _, _ = select.select([self.status], [], [], timeout)
        if not ready:
            raise LaunchError(f"fragment {self.index} said nothing for {timeout:.0f}s")
        line = self.status.readline()
        if not line:
            raise LaunchError(
                f"fragment {self.index} exited during start-up (status {self.process.poll()})"
            )
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event


@dataclass
class LocalVm:
    """A guest running as several local fragment processes."""

    fragments: list[RunningFragment]

    def wait(self, timeout: float | None = None) -> int:
        """Wait for every fragment; fragment 0's exit status, or EXIT_VM_ERROR if any failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        codes = []
        for f in self.fragments:
            left = None if deadline is None else max(0.1, deadline - time.monotonic())
            codes.append(f.process.wait(left))
        for f in self.fragments:
            f.events += [json.loads(line) for line in f.status.read().splitlines() if line.strip()]
        for f, code in zip(self.fragments, codes, strict=True):
            if code < 0:  # a signal: the fragment could not say why itself
                print(
                    f"spanvm: fragment {f.index} died of {signal.Signals(-code).name}",
                    file=sys.stderr,
                )
        if any(code != 0 for code in codes[1:]) or codes[0] < 0:
            return EXIT_VM_ERROR
        return codes[0]

    def kill(self) -> None:
        for f in self.fragments:
            if f.process.poll() is None:
                f.process.kill()
        for f in self.fragments:
            f.process.wait()


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
    readahead: int = READAHEAD,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
) -> Iterator[LocalVm]:
    """Start the fragments (and namespaces); yields the running VM; always cleans up."""
    split = split_vcpus(vcpus, fragments)
    homes = [
        (h.start, h.end, h.index) for h in plan_homes(memory, [len(s) for s in split], home_policy)
    ]
    secret = secrets.token_hex(32)
    net = NamespaceNet(fragments) if netns else None
    running: list[RunningFragment] = []
    try:
        if net is not None:
            net.create()
        endpoints: dict[int, str] = {}
        for index, vcpu_ids in enumerate(split):
            config = FragmentConfig(
                index=index,
                fragment_count=fragments,
                vcpu_count=vcpus,
                vcpu_ids=vcpu_ids,
                memory=memory,
                payload=payload,
                arg=arg,
                homes=homes,
                listen_host=net.address(index) if net else "127.0.0.1",
                peers=dict(endpoints),
                secret=secret,
                idle_timeout=idle_timeout if index == 0 else None,
                node_name=net.namespace(index) if net else f"local-{index}",
                readahead=readahead,
            )
            read_fd, write_fd = os.pipe()
            command = [sys.executable, "-m", "spanvm.cli", "fragment", "--status-fd", str(write_fd)]
            if net is not None:
                command = ["ip", "netns", "exec", net.namespace(index), *command]
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                stdout=stdout if index == 0 else subprocess.DEVNULL,
                stderr=stderr,
            )
            os.close(write_fd)
            assert process.stdin is not None
            process.stdin.write(config.model_dump_json().encode())
            process.stdin.close()
            fragment = RunningFragment(index, process, os.fdopen(read_fd, "r"))
            running.append(fragment)
            event = fragment.read_status(START_TIMEOUT)
            if event.get("event") != "listening":
                raise LaunchError(f"fragment {index}: {event}")
            fragment.endpoint = endpoints[index] = event["endpoint"]
        yield LocalVm(running)
    finally:
        LocalVm(running).kill()
        for f in running:
            f.status.close()
        if net is not None:
            net.destroy()
