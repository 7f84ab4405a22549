"""The coherence protocol: a home-based directory with Modified / Shared / Invalid pages.

Every coherent guest page has a home fragment (homes.py). The home keeps the page's directory
entry, owner (a fragment holding it Modified) or sharers (fragments holding it Shared,
write-protected), and serialises every request for it under a per-page lock; every directive
about a page comes from its home over one ordered connection, so each fragment applies them
in order. Invariant: while a page has no owner, the home holds a Shared copy.

- READ (a guest read of a missing page): the home downgrades the owner (its copy becomes
  write-protected, the data comes home) and grants a Shared copy.
- WRITE (a write to a missing page, or a write-protect fault on a Shared one): the home
  invalidates every other holder (they drop it with MADV_DONTNEED) and grants ownership.
Requests, grants and directives are idempotent where a race can repeat them.
"""

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from spanvm.fabric.homes import PAGE, HomeMap
from spanvm.fabric.uffd import Fault, Userfault
from spanvm.fabric.wire import EXCLUSIVE, HAS_DATA, WANT_DATA, Frame, Kind
from spanvm.vmm.memory import GuestMemory

INVALID, SHARED, MODIFIED = 0, 1, 2
LOCK_STRIPES = 1024
NO_OWNER = -1


class CoherenceError(RuntimeError):
    """A message contradicts the protocol's state: the VM must stop."""


@dataclass
class Counters:
    """What the fabric did on this fragment."""

    page_faults: int = 0
    remote_faults: int = 0
    pages_in: int = 0
    pages_out: int = 0
    invalidations: int = 0
    remote_fault_seconds: list[float] = field(default_factory=list)

    def fault_percentiles(self) -> dict[str, float]:
        """p50/p99 of remote fault service time in microseconds (empty without samples)."""
        samples = sorted(self.remote_fault_seconds)
        if not samples:
            return {}

        def pick(q: float) -> float:
            return round(samples[min(len(samples) - 1, int(len(samples) * q))] * 1e6, 1)

        return {
            "remote_fault_p50_us": pick(0.5),
            "remote_fault_p99_us": pick(0.99),
            "remote_faults": len(samples),
        }


# send(peer, frame) and request(peer, frame) -> reply frame, provided by the transport.
Send = Callable[[int, Frame], None]
Request = Callable[[int, Frame], Frame]


class Coherence:
    """One fragment's side of the protocol: its pages' local states and its home directory."""

    def __init__(
        self,
        index: int,
        *,
        memory: GuestMemory,
        uffd: Userfault,
        homes: HomeMap,
        send: Send,
        request: Request,
    ) -> None:
        self.index = index
        self.memory = memory
        self.uffd = uffd
        self.homes = homes
        self.send = send
        self.request = request
        self.state = bytearray(memory.size // PAGE)  # by host page number
        self.owner: dict[int, int] = {}  # home pages only; default: this fragment
        self.sharers: dict[int, int] = {}  # home pages only; bitmask of fragment indexes
        self.locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self.counters = Counters()

    # -- addresses -------------------------------------------------------------------------
    def host(self, page: int) -> int:
        return self.memory.host_address + self.memory.host_offset(page * PAGE, PAGE)

    def page_of_host(self, address: int) -> int:
        offset = address - self.memory.host_address
        for r in self.memory.ranges:
            if r.host_offset <= offset < r.host_offset + r.size:
                return (r.gpa + offset - r.host_offset) // PAGE
        raise CoherenceError(f"fault at host address {address:#x} outside guest RAM")

    def _slot(self, page: int) -> int:
        return self.memory.host_offset(page * PAGE, PAGE) // PAGE

    def local_state(self, page: int) -> int:
        return self.state[self._slot(page)]

    def adopt_initial_contents(self, loaded_end: int) -> None:
        """After the monitor wrote the image (guest-physical up to `loaded_end`, the only
        coherent pages it touched): keep those this fragment is home for as Modified, drop
        the rest. Untouched home pages stay Invalid here and start as zeros on first use."""
        for h in self.homes.homes:
            for page in range(h.start // PAGE, min(h.end, loaded_end + PAGE - 1) // PAGE):
                if h.index == self.index:
                    self.state[self._slot(page)] = MODIFIED
                else:
                    Userfault.drop(self.host(page))

    # -- local page operations (one writer per page at a time, see module doc) -------------
    def _data(self, page: int) -> bytes:
        if self.local_state(page) == INVALID:
            return b""  # never touched: zeros
        return ctypes.string_at(self.host(page), PAGE)

    def _install(self, page: int, data: bytes, writable: bool) -> None:
        self.uffd.install(self.host(page), data or None, writable)
        self.state[self._slot(page)] = MODIFIED if writable else SHARED

    def _protect(self, page: int) -> None:
        if self.local_state(page) == MODIFIED:
            self.uffd.protect(self.host(page))
            self.state[self._slot(page)] = SHARED

    def _drop(self, page: int) -> None:
        if self.local_state(page) != INVALID:
            Userfault.drop(self.host(page))
            self.state[self._slot(page)] = INVALID
            self.counters.invalidations += 1

    def _unprotect(self, page: int) -> None:
        self.uffd.unprotect(self.host(page))
        self.state[self._slot(page)] = MODIFIED

    # -- the fault path (the uffd thread) ----------------------------------------------------
    def handle_fault(self, fault: Fault) -> None:
        """Resolve one guest fault: locally when this fragment is home, else from the home."""
        page = self.page_of_host(fault.address)
        wants_write = fault.write or fault.wp
        state = self.local_state(page)
        if state == MODIFIED or (state == SHARED and not wants_write):
            self.uffd.wake(fault.address)  # already resolved by an earlier event
            return
        self.counters.page_faults += 1
        kind = Kind.WRITE if wants_write else Kind.READ
        home = self.homes.home(page)
        if home == self.index:
            self.serve(self.index, kind, page, request_id=0)
            return
        started = time.perf_counter()
        self.request(home, Frame(kind, page=page))  # the grant is applied by the reader
        self.counters.remote_faults += 1
        if len(self.counters.remote_fault_seconds) < 100_000:
            self.counters.remote_fault_seconds.append(time.perf_counter() - started)

    # -- the home side ------------------------------------------------------------------------
    def serve(self, requester: int, kind: Kind, page: int, request_id: int) -> None:
        """Handle READ/WRITE for a page this fragment is home for; grants go out under the lock."""
        if self.homes.home(page) != self.index:
            raise CoherenceError(
                f"fragment {requester} asked fragment {self.index} for page {page:#x},"
                " which is homed elsewhere"
            )
        with self.locks[page % LOCK_STRIPES]:
            if kind == Kind.READ:
                self._serve_read(requester, page, request_id)
            else:
                self._serve_write(requester, page, request_id)

    def _grant(self, requester: int, page: int, request_id: int, flags: int, data: bytes) -> None:
        if requester == self.index:
            return
        if flags & HAS_DATA:
            self.counters.pages_out += 1
        self.send(requester, Frame(Kind.GRANT, flags, request_id, page, data))

    def _serve_read(self, r: int, page: int, request_id: int) -> None:
        me, bit = self.index, 1 << r
        owner = self.owner.get(page, me)
        sharers = self.sharers.get(page, 0)
        if owner == r or sharers & bit:  # a repeated request: it has the page already
            if r == me and self.local_state(page) == INVALID:
                self._install(page, b"", writable=owner == me)  # first touch of a home page
            self._grant(r, page, request_id, EXCLUSIVE if owner == r else 0, b"")
            return
        if owner != NO_OWNER:
            if owner == me:
                if self.local_state(page) == INVALID:
                    self._install(page, b"", writable=False)
                else:
                    self._protect(page)
            else:
                reply = self.request(owner, Frame(Kind.DOWNGRADE, page=page))
                self._install(page, reply.payload, writable=False)
                self.counters.pages_in += 1
            sharers, owner = (1 << owner) | (1 << me), NO_OWNER
        self.owner[page] = NO_OWNER
        self.sharers[page] = sharers | bit
        self._grant(r, page, request_id, HAS_DATA, self._data(page))

    def _serve_write(self, r: int, page: int, request_id: int) -> None:
        me, bit = self.index, 1 << r
        owner = self.owner.get(page, me)
        sharers = self.sharers.get(page, 0)
        if owner == r:  # a repeated request
            if r == me and self.local_state(page) == INVALID:
                self._install(page, b"", writable=True)
            self._grant(r, page, request_id, EXCLUSIVE, b"")
            return
        had_copy = bool(sharers & bit)
        data = b""
        if owner != NO_OWNER:
            if owner == me:
                self._protect(page)
                data = self._data(page)
                self._drop(page)
            else:
                reply = self.request(owner, Frame(Kind.INVALIDATE, WANT_DATA, page=page))
                data = reply.payload
                self.counters.pages_in += 1
        else:
            if not had_copy:
                data = self._data(page)
            for s in range(64):
                if sharers >> s & 1 and s != r:
                    if s == me:
                        self._drop(page)
                    else:
                        self.request(s, Frame(Kind.INVALIDATE, page=page))
        self.owner[page] = r
        self.sharers[page] = 0
        if r == me:
            if had_copy:
                self._unprotect(page)
            else:
                self._install(page, data, writable=True)
            return
        self._grant(r, page, request_id, EXCLUSIVE | (0 if had_copy else HAS_DATA), data)

    # -- directives and grants from a home (a reader thread, in connection order) -----------
    def on_directive(self, frame: Frame) -> Frame:
        """DOWNGRADE or INVALIDATE from the page's home; returns the reply."""
        page = frame.page
        state = self.local_state(page)
        if frame.kind == Kind.DOWNGRADE:
            if state != MODIFIED:
                raise CoherenceError(
                    f"DOWNGRADE of page {page:#x} that fragment {self.index} does not own"
                )
            self._protect(page)
            self.counters.pages_out += 1
            return Frame(Kind.DATA, request=frame.request, page=page, payload=self._data(page))
        if frame.flags & WANT_DATA:
            if state != MODIFIED:
                raise CoherenceError(
                    f"INVALIDATE+data of page {page:#x} that fragment {self.index} does not own"
                )
            self._protect(page)
            data = self._data(page)
            self._drop(page)
            self.counters.pages_out += 1
            return Frame(Kind.DATA, request=frame.request, page=page, payload=data)
        self._drop(page)
        return Frame(Kind.ACK, request=frame.request, page=page)

    def on_grant(self, frame: Frame) -> None:
        """Apply a GRANT before the waiting fault handler resumes."""
        page, exclusive = frame.page, bool(frame.flags & EXCLUSIVE)
        state = self.local_state(page)
        if frame.flags & HAS_DATA:
            if state != INVALID:
                raise CoherenceError(
                    f"GRANT with data for page {page:#x} already held by fragment {self.index}"
                )
            self._install(page, frame.payload, writable=exclusive)
            self.counters.pages_in += 1
        elif exclusive and state == SHARED:
            self._unprotect(page)
        elif state == INVALID:
            raise CoherenceError(
                f"GRANT without data for page {page:#x} that fragment {self.index} lacks"
            )
        else:
            self.uffd.wake(self.host(page))
