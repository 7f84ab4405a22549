"""A deterministic explorer of the coherence protocol over N fragments in one process.

Every fragment is the real `Coherence` object behind a real `Transport`'s dispatch
(`Transport._dispatch`, the code a reader thread runs for each frame). What is simulated:
- the network: each direction of each connection is a FIFO queue (TCP keeps order within a
  direction, nothing orders two connections);
- the threads: a fragment's fault-service thread, one reader per connection and the home's
  workers are greenlets; each runs until it blocks on a reply or a page lock;
- the kernel under the real `Userfault` class (`SimKernel`): which pages a fragment's mapping
  has present and writable, with the semantics of UFFDIO_COPY (EEXIST, partial copies),
  write-protect, wake and MADV_DONTNEED; every such call lets other threads run first, as the
  real call releases the GIL; guest RAM itself is a real anonymous mapping;
- vCPUs: each runs a list of reads and writes; an access its mapping does not allow faults
  (one event, as the kernel queues it) and waits to be woken, then retries.

At every step a seeded RNG picks one thing to do: deliver the oldest frame of some connection
direction, resume a thread whose wait is over, or let a vCPU make its next access. After every
step it checks single writer / multiple readers on the mappings, that every present copy holds
the last value written (so every read returns the last write), and that each fragment's
protocol state agrees with its mapping; it reports a deadlock (work left, nothing can run) and
a livelock (the step budget spent). Failures carry the seed and the last steps taken.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import random
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import greenlet

from spanvm.fabric import uffd
from spanvm.fabric.coherence import INVALID, MODIFIED, SHARED, Coherence
from spanvm.fabric.fragment import protocol_handlers, unwired
from spanvm.fabric.homes import PAGE, HomeMap, HomeRange
from spanvm.fabric.transport import Handlers, Peer, Transport
from spanvm.fabric.uffd import Fault, Userfault
from spanvm.fabric.wire import HEADER, Frame, Kind
from spanvm.vmm.kvm_abi import MADV_DONTNEED
from spanvm.vmm.layout import IMAGE_BASE
from spanvm.vmm.memory import GuestMemory

POISON = b"\xde\xad\xbe\xef" * (PAGE // 4)  # what a dropped page reads as here
WORD = struct.Struct("<Q")


class ExplorationError(AssertionError):
    """An invariant broke, the system deadlocked or livelocked; the text says how to replay."""


class _Task:
    """A simulated thread: a greenlet plus the condition it waits for."""

    def __init__(self, name: str, run: Callable[[], None], parent: greenlet.greenlet) -> None:
        self.name = name
        self.glet = greenlet.greenlet(run, parent)
        self.ready: Callable[[], bool] = lambda: True
        self.waiting_for = "start"
        self.done = False


class SimLock:
    """A page lock for greenlets: a blocking acquire yields to the scheduler until free."""

    def __init__(self, explorer: Explorer) -> None:
        self._explorer = explorer
        self.held = False

    def acquire(self, blocking: bool = True) -> bool:
        if self.held and not blocking:
            return False
        if self.held:
            self._explorer.block(lambda: not self.held, "a page lock")
        self.held = True
        return True

    def release(self) -> None:
        assert self.held, "release of a free lock"
        self.held = False

    def __enter__(self) -> SimLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SimKernel:
    """One fragment's userfaultfd and madvise, simulated over its real mapping, for the real
    `Userfault` class (the `uffd.Kernel` port). Every call first yields to the scheduler, as
    the real call releases the GIL: other threads may run before it takes effect."""

    def __init__(self, explorer: Explorer, index: int) -> None:
        self._explorer, self.index = explorer, index
        self.present: set[int] = set()  # host page addresses
        self.writable: set[int] = set()

    def userfaultfd(self, flags: int) -> int:
        return 1000 + self.index

    def close(self, fd: int) -> None:
        pass

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        if request in (uffd.UFFDIO_API_IOCTL, uffd.UFFDIO_REGISTER):
            return 0
        self._explorer.yield_point()
        if request == uffd.UFFDIO_COPY:
            return self._copy(uffd.UffdioCopy.from_address(arg))
        if request == uffd.UFFDIO_WRITEPROTECT:
            wp = uffd.UffdioWriteprotect.from_address(arg)
            pages = range(wp.range.start, wp.range.start + wp.range.len, PAGE)
            for page in pages:
                if wp.mode & uffd.UFFDIO_WRITEPROTECT_MODE_WP:
                    self.writable.discard(page)
                elif page in self.present:
                    self.writable.add(page)
            if not wp.mode & uffd.UFFDIO_WRITEPROTECT_MODE_WP:
                self._wake(wp.range.start, wp.range.len)
            return 0
        if request == uffd.UFFDIO_WAKE:
            wake = uffd.UffdioRange.from_address(arg)
            self._wake(wake.start, wake.len)
            return 0
        raise AssertionError(f"unexpected userfaultfd ioctl {request:#x}")

    def _copy(self, copy: uffd.UffdioCopy) -> int:
        """UFFDIO_COPY as mm/userfaultfd.c does it: page by page from `src` as it is now;
        EEXIST if the first page is present, else a partial copy (woken) and EAGAIN."""
        for done in range(0, copy.len, PAGE):
            page = copy.dst + done
            if page in self.present:
                if done == 0:
                    copy.copy = -errno.EEXIST
                    return -errno.EEXIST
                copy.copy = done
                self._wake(copy.dst, done)
                return -errno.EAGAIN
            ctypes.memmove(page, copy.src + done, PAGE)
            self.present.add(page)
            if not copy.mode & uffd.UFFDIO_COPY_MODE_WP:
                self.writable.add(page)
        copy.copy = copy.len
        self._wake(copy.dst, copy.len)
        return 0

    def madvise(self, address: int, length: int, advice: int) -> int:
        assert advice == MADV_DONTNEED
        self._explorer.yield_point()
        for page in range(address, address + length, PAGE):
            self.present.discard(page)
            self.writable.discard(page)
            ctypes.memmove(page, POISON, PAGE)
        return 0

    def _wake(self, start: int, length: int) -> None:
        for page in range(start, start + length, PAGE):
            self._explorer.wake(self.index, page)


class SimTransport(Transport):
    """The real dispatch of incoming frames; sending, waiting and workers go through the
    explorer instead of sockets and threads."""

    def __init__(self, explorer: Explorer, index: int, count: int) -> None:
        unset = Handlers(*(unwired,) * 6)
        super().__init__(index, count, b"\0" * 32, unset)
        self._workers.shutdown()
        self._explorer = explorer
        self._workers = _SimPool(explorer, index)  # type: ignore[assignment]

    def send(self, index: int, frame: Frame) -> None:
        # What the socket would carry: chunks are read (from guest memory) as sent.
        payload = b"".join(frame.buffers())[HEADER.size :]
        self._explorer.post(self.index, index, replace(frame, payload=payload, chunks=()))

    def submit(self, index: int, frame: Frame) -> Callable[[], Frame]:
        request_id = next(self._ids)
        future: Future[Frame] = Future()
        self._pending[request_id] = (index, future)
        self.send(index, replace(frame, request=request_id))

        def wait() -> Frame:
            self._explorer.block(future.done, f"reply {request_id} from fragment {index}")
            return future.result()

        return wait

    def deliver(self, source: int, frame: Frame) -> None:
        self._dispatch(Peer(source, None), frame)  # type: ignore[arg-type]


class _SimPool:
    def __init__(self, explorer: Explorer, index: int) -> None:
        self._explorer, self._index = explorer, index
        self._names = itertools.count()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._explorer.spawn(f"f{self._index}-worker{next(self._names)}", lambda: fn(*args))


@dataclass
class SimVcpu:
    """A guest vCPU: a list of (is_write, page) accesses, made one per step."""

    fragment: int
    ops: list[tuple[bool, int]]
    pos: int = 0
    blocked_on: int | None = None  # host address of the page it faulted on
    woken: bool = False

    def can_act(self) -> bool:
        return self.pos < len(self.ops) and (self.blocked_on is None or self.woken)


@dataclass
class SimFragment:
    """One fragment: its memory, simulated userfaultfd, coherence and transport."""

    index: int
    memory: GuestMemory
    kernel: SimKernel
    coherence: Coherence
    transport: SimTransport
    faults: deque[Fault] = field(default_factory=deque)


class Explorer:
    """N fragments, `pages_per_home` pages homed on each, vCPUs making random accesses."""

    def __init__(
        self,
        fragments: int,
        seed: int,
        *,
        pages_per_home: int = 3,
        ops_per_vcpu: int = 24,
        vcpus_per_fragment: int = 1,
        readahead: int = 3,
        loaded_pages: int = 2,
        max_steps: int = 50_000,
        sequential: float = 0.0,
        userfault: type[Userfault] = Userfault,
        coherence: type[Coherence] = Coherence,
    ) -> None:
        """`userfault` and `coherence` let a test run a variant of the real classes (a
        mutant the explorer must catch)."""
        self.userfault_class, self.coherence_class = userfault, coherence
        self.rng = random.Random(seed)
        self.seed, self.max_steps = seed, max_steps
        self.main = greenlet.getcurrent()
        self.tasks: list[_Task] = []
        self.current: _Task | None = None
        self.net: dict[tuple[int, int], deque[Frame]] = {}
        self.reading: set[tuple[int, int]] = set()  # directions whose reader is busy
        self.trace: deque[str] = deque(maxlen=60)
        self.failures: list[str] = []
        self.values = itertools.count(1)
        span = pages_per_home * PAGE
        self.homes = HomeMap(
            [
                HomeRange(IMAGE_BASE + i * span, IMAGE_BASE + (i + 1) * span, i)
                for i in range(fragments)
            ]
        )
        self.page_numbers = [IMAGE_BASE // PAGE + p for p in range(fragments * pages_per_home)]
        self.truth: dict[int, int] = dict.fromkeys(self.page_numbers, 0)
        self.fragments: list[SimFragment] = []
        memory_size = IMAGE_BASE + fragments * span
        loaded_end = IMAGE_BASE + loaded_pages * PAGE
        for index in range(fragments):
            self.fragments.append(self._fragment(index, fragments, memory_size, readahead))
        for page in self.page_numbers[:loaded_pages]:  # the monitor wrote the image everywhere
            self.truth[page] = next(self.values)
            for f in self.fragments:
                address = f.coherence.host(page)
                ctypes.memmove(address, WORD.pack(self.truth[page]), WORD.size)
                f.kernel.present.add(address)
                f.kernel.writable.add(address)
        for f in self.fragments:
            f.coherence.adopt_initial_contents([(IMAGE_BASE, loaded_end)])
        self.vcpus = [
            SimVcpu(f.index, self._accesses(ops_per_vcpu, sequential))
            for f in self.fragments
            for _ in range(vcpus_per_fragment)
        ]

    def _accesses(self, count: int, sequential: float) -> list[tuple[bool, int]]:
        """`count` (is_write, page) accesses; each goes on to the page after the previous one
        with probability `sequential` (runs that make the fabric read ahead), else anywhere."""
        ops: list[tuple[bool, int]] = []
        for _ in range(count):
            write = self.rng.random() < 0.4
            if ops and ops[-1][1] + 1 in self.truth and self.rng.random() < sequential:
                ops.append((write, ops[-1][1] + 1))
            else:
                ops.append((write, self.rng.choice(self.page_numbers)))
        return ops

    def _fragment(self, index: int, count: int, memory_size: int, readahead: int) -> SimFragment:
        memory = GuestMemory(memory_size)
        kernel = SimKernel(self, index)
        coherent = memory.host_address + IMAGE_BASE
        userfault = self.userfault_class(coherent, memory.size - IMAGE_BASE, kernel=kernel)

        def fail(message: str) -> None:
            self.failures.append(f"fragment {index}: {message}")

        transport = SimTransport(self, index, count)
        coherence = self.coherence_class(
            index,
            memory=memory,
            uffd=userfault,
            homes=self.homes,
            send=transport.send,
            request=transport.request,
            readahead=readahead,
            submit=transport.submit,
        )
        coherence.locks = [SimLock(self) for _ in coherence.locks]  # type: ignore[misc]
        transport.handlers = protocol_handlers(coherence, lambda peer, frame: None, fail)
        fragment = SimFragment(index, memory, kernel, coherence, transport)
        self.spawn(f"f{index}-uffd", lambda: self._fault_loop(fragment))
        return fragment

    # -- what the simulated threads call --------------------------------------------------
    def block(self, ready: Callable[[], bool], what: str) -> None:
        """Yield to the scheduler until `ready()`; only from inside a task."""
        task = self.current
        assert task is not None, "block() outside a simulated thread"
        task.ready, task.waiting_for = ready, what
        while True:
            self.main.switch()
            if ready():
                return

    def yield_point(self) -> None:
        """Let other simulated threads run first (a call that releases the GIL)."""
        if self.current is not None:
            self.block(lambda: True, "its turn after a system call")

    def spawn(self, name: str, run: Callable[[], None]) -> _Task:
        task = _Task(name, run, self.main)
        self.tasks.append(task)
        return task

    def post(self, source: int, target: int, frame: Frame) -> None:
        self.net.setdefault((source, target), deque()).append(frame)

    def wake(self, index: int, address: int) -> None:
        for v in self.vcpus:
            if v.fragment == index and v.blocked_on == address:
                v.woken = True

    def _fault_loop(self, fragment: SimFragment) -> None:
        while True:
            self.block(lambda: bool(fragment.faults), "a page fault")
            while fragment.faults:
                fragment.coherence.handle_fault(fragment.faults.popleft())

    # -- the scheduler -------------------------------------------------------------------
    def run(self) -> int:
        """Explore until every vCPU is done; returns the steps taken, or raises."""
        for step in range(self.max_steps):
            self._check(step)
            choices: list[tuple[str, Any]] = [
                ("deliver", key)
                for key, queue in self.net.items()
                if queue and (key[1], key[0]) not in self.reading
            ]
            choices += [("task", t) for t in self.tasks if not t.done and t.ready()]
            choices += [("vcpu", v) for v in self.vcpus if v.can_act()]
            if not choices:
                if all(v.pos == len(v.ops) for v in self.vcpus):
                    return step
                self._fail("deadlock: nothing can run", step)
            kind, what = self.rng.choice(choices)
            if kind == "deliver":
                self._deliver(*what)
            elif kind == "task":
                self._resume(what)
            else:
                self._access(what)
        self._fail(f"livelock: vCPUs not done after {self.max_steps} steps", self.max_steps)
        raise AssertionError("unreachable")

    def _deliver(self, source: int, target: int) -> None:
        frame = self.net[(source, target)].popleft()
        self.trace.append(f"deliver {source}->{target} {_describe(frame)}")
        key = (target, source)
        self.reading.add(key)

        def read() -> None:
            try:
                self.fragments[target].transport.deliver(source, frame)
            finally:
                self.reading.discard(key)

        self._resume(self.spawn(f"f{target}-reader{source}", read))

    def _resume(self, task: _Task) -> None:
        self.trace.append(f"run {task.name} ({task.waiting_for})")
        self.current = task
        try:
            task.glet.switch()
        except Exception as err:
            self.failures.append(f"{task.name}: {type(err).__name__}: {err}")
        finally:
            self.current = None
        if task.glet.dead:
            task.done = True
            self.tasks.remove(task)

    def _access(self, vcpu: SimVcpu) -> None:
        write, page = vcpu.ops[vcpu.pos]
        fragment = self.fragments[vcpu.fragment]
        address = fragment.coherence.host(page)
        present = address in fragment.kernel.present
        allowed = address in fragment.kernel.writable if write else present
        what = f"vCPU of f{vcpu.fragment} {'writes' if write else 'reads'} page {page:#x}"
        if not allowed:
            if vcpu.blocked_on is None or vcpu.woken:  # a new fault event
                fragment.faults.append(Fault(address, write, write and present, 0.0, id(vcpu)))
                self.trace.append(f"{what}: fault")
            vcpu.blocked_on, vcpu.woken = address, False
            return
        vcpu.blocked_on, vcpu.woken = None, False
        vcpu.pos += 1
        if write:
            value = next(self.values)
            ctypes.memmove(address, WORD.pack(value), WORD.size)
            self.truth[page] = value
            self.trace.append(f"{what}: {value}")
            return
        (seen,) = WORD.unpack(ctypes.string_at(address, WORD.size))
        self.trace.append(f"{what}: {seen}")
        if seen != self.truth[page]:
            self.failures.append(
                f"stale read: {what} returned {seen}, the last write was {self.truth[page]}"
            )

    # -- invariants ----------------------------------------------------------------------
    def _check(self, step: int) -> None:
        for page in self.page_numbers:
            holders, writers = [], []
            for f in self.fragments:
                address = f.coherence.host(page)
                present = address in f.kernel.present
                writable = address in f.kernel.writable
                state = f.coherence.local_state(page)
                want = MODIFIED if writable else SHARED if present else INVALID
                if state != want:
                    self.failures.append(
                        f"fragment {f.index} page {page:#x}: protocol state {state},"
                        f" mapping says {want}"
                    )
                if present:
                    holders.append(f.index)
                    (value,) = WORD.unpack(ctypes.string_at(address, WORD.size))
                    if value != self.truth[page]:
                        self.failures.append(
                            f"fragment {f.index} holds page {page:#x} with {value:#x},"
                            f" the last write was {self.truth[page]}"
                        )
                if writable:
                    writers.append(f.index)
            if writers and holders != writers:
                self.failures.append(
                    f"page {page:#x} writable on {writers} while present on {holders}"
                )
        if self.failures:
            self._fail("; ".join(dict.fromkeys(self.failures)), step)

    def _fail(self, message: str, step: int) -> None:
        blocked = [f"{t.name} waits for {t.waiting_for}" for t in self.tasks if not t.ready()]
        pending = {f"{s}->{t}": len(q) for (s, t), q in self.net.items() if q}
        raise ExplorationError(
            f"seed {self.seed}, step {step}: {message}\nblocked: {blocked}\n"
            f"undelivered: {pending}\nlast steps:\n  " + "\n  ".join(self.trace)
        )

    def close(self) -> None:
        for task in self.tasks:
            if task.glet:  # started and suspended: end it where it waits
                task.glet.throw(greenlet.GreenletExit)
        for f in self.fragments:
            f.memory.close()


def _describe(frame: Frame) -> str:
    return (
        f"{frame.kind.name} page={frame.page:#x} req={frame.request} flags={frame.flags}"
        f" v={frame.page_version}"
    )


def explore(fragments: int, seed: int, **options: Any) -> int:
    """Run one seeded exploration; returns the steps it took, raises ExplorationError."""
    explorer = Explorer(fragments, seed, **options)
    try:
        return explorer.run()
    finally:
        explorer.close()


__all__ = ["ExplorationError", "Explorer", "Kind", "explore"]
