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

import contextlib
import ctypes
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from spanvm.fabric.homes import PAGE, HomeMap
from spanvm.fabric.readahead import ReadAhead
from spanvm.fabric.uffd import Fault, Userfault
from spanvm.fabric.wire import BATCH, EXCLUSIVE, HAS_DATA, MIGRATE, WANT_DATA, Frame, Kind
from spanvm.vmm.memory import GuestMemory

INVALID, SHARED, MODIFIED = 0, 1, 2
LOCK_STRIPES = 1024
READAHEAD = 64  # pages a remote fault on a missing page asks for (home sends the cheap ones)
BATCH_HEADER = struct.Struct("<QQQ")  # included, exclusive, zero-filled bitmaps of a batch
NO_OWNER = -1


# Upper bounds (seconds) of the remote fault latency histogram: 50 us (a local-ish fault) to
# 100 ms (a peer that is struggling).
REMOTE_FAULT_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 0.1)


class CoherenceError(RuntimeError):
    """A message contradicts the protocol's state: the VM must stop."""


MAX_SAMPLES = 100_000  # latency samples a fragment keeps (faults, interrupts)


def nearest_rank(ordered: list[float], percent: int) -> float:
    """The `percent`-th percentile of non-empty, sorted `ordered`: the sample at rank
    n * percent // 100 (0-based, clamped to the last)."""
    return ordered[min(len(ordered) - 1, len(ordered) * percent // 100)]


@dataclass
class Counters:
    """What the fabric did on this fragment."""

    page_faults: int = 0
    remote_faults: int = 0
    pages_in: int = 0
    pages_out: int = 0
    invalidations: int = 0
    prefetch_waits: int = 0  # faults on a page whose window was asked for ahead, still coming
    # pages this fragment gave up with their data in one batch (MIGRATE): a home's pages that
    # moved to a sequential reader, or an owner's run of two or more its home took back (a
    # single page taken back is an INVALIDATE+data, counted in invalidations only)
    pages_moved: int = 0
    remote_fault_seconds: list[float] = field(default_factory=list)

    def fault_percentiles(self) -> dict[str, float]:
        """p50/p99 of remote fault service time in microseconds (empty without samples)."""
        samples = sorted(self.remote_fault_seconds)
        if not samples:
            return {}
        return {
            "remote_fault_p50_us": round(nearest_rank(samples, 50) * 1e6, 1),
            "remote_fault_p99_us": round(nearest_rank(samples, 99) * 1e6, 1),
            "remote_faults": len(samples),
        }

    def fault_histogram(self) -> dict[str, Any]:
        """Remote fault service times as a cumulative histogram (Prometheus buckets, seconds),
        over every sample kept; the agent exports it per fragment."""
        samples = self.remote_fault_seconds
        return {
            "remote_fault_buckets": [
                [bound, sum(s <= bound for s in samples)] for bound in REMOTE_FAULT_BUCKETS
            ],
            "remote_fault_seconds_sum": sum(samples),
            "remote_fault_samples": len(samples),
        }


# send(peer, frame) and request(peer, frame) -> reply frame, provided by the transport.
Send = Callable[[int, Frame], None]
Request = Callable[[int, Frame], Frame]
# submit(peer, frame) -> wait: a request sent at once whose reply is waited for later.
Submit = Callable[[int, Frame], Callable[[], Frame]]


def _done(reply: Frame) -> Callable[[], Frame]:
    return lambda: reply


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
        readahead: int = READAHEAD,
        submit: Submit | None = None,
    ) -> None:
        """`submit` sends a request without waiting and returns the wait for its reply (by
        default: `request` at once, so nothing is asked for ahead of the guest)."""
        self.index = index
        self.memory = memory
        self.uffd = uffd
        self.homes = homes
        self.send = send
        self.request = request
        self.submit: Submit = submit or (lambda peer, frame: _done(request(peer, frame)))
        self.state = bytearray(memory.size // PAGE)  # by host page number
        low = memory.ranges[0]  # guest pages below this are host pages of the same number
        self._direct_pages = low.size // PAGE if low.gpa == 0 == low.host_offset else 0
        self.owner: dict[int, int] = {}  # home pages only; default: this fragment
        self.sharers: dict[int, int] = {}  # home pages only; bitmask of fragment indexes
        # Per-page versions: the home counts ownership changes; every fragment remembers the
        # newest version it applied and refuses an older one (a stale grant or a lost update).
        self.version: dict[int, int] = {}  # home pages only
        # Home pages whose owner got them by a move (MIGRATE) rather than a write or a first
        # touch: this home's own scan shares them rather than taking them back, or a home and
        # a reader scanning the same data would move it back and forth on every scan. Only
        # read while the page has an owner other than the home; an entry left after the page
        # became shared is harmless, and every later change of owner clears it.
        self.moved: set[int] = set()
        self.seen: dict[int, int] = {}
        self.locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self.counters = Counters()
        self.readahead = max(1, min(64, readahead))
        self._installed_at = 0.0  # when the last grant was applied (the fault thread's own)
        self._streams: dict[int, ReadAhead] = {}  # by faulting thread: the fault thread's own

    # -- addresses -------------------------------------------------------------------------
    def host(self, page: int) -> int:
        return self.memory.host_address + self._slot(page) * PAGE

    def page_of_host(self, address: int) -> int:
        slot = (address - self.memory.host_address) // PAGE
        if 0 <= slot < self._direct_pages:
            return slot
        try:
            return self.memory.gpa_of(address) // PAGE
        except ValueError:
            raise CoherenceError(f"fault at host address {address:#x} outside guest RAM") from None

    def _slot(self, page: int) -> int:
        if page < self._direct_pages:
            return page
        return self.memory.host_offset(page * PAGE, PAGE) // PAGE

    def local_state(self, page: int) -> int:
        return self.state[self._slot(page)]

    def _set_states(self, first: int, count: int, value: int) -> None:
        """Mark `count` pages from `first` INVALID, SHARED or MODIFIED here, in one slice: the
        pages of a run lie in one home range, hence in one RAM range, at consecutive slots."""
        slot = self._slot(first)
        self.state[slot : slot + count] = bytes((value,)) * count

    def adopt_initial_contents(self, written: Iterable[tuple[int, int]]) -> None:
        """After the monitor wrote guest memory (guest-physical [start, end) ranges: the
        image, boot data, firmware tables): keep the written pages this fragment is home for
        as Modified, drop the others. Unwritten pages stay Invalid and start as zeros on first
        use (marking them Modified would leave a fault on them unresolved)."""
        pages: set[int] = set()
        for start, end in written:
            pages.update(range(start // PAGE, (end + PAGE - 1) // PAGE))
        for page in sorted(pages):
            try:
                home = self.homes.home(page)
            except KeyError:
                continue  # not coherent memory (a payload's per-fragment system area)
            if home == self.index:
                self.state[self._slot(page)] = MODIFIED
            else:
                self.uffd.drop(self.host(page))

    # -- local page operations (one writer per page at a time, see module doc) -------------
    def _data(self, page: int) -> bytes:
        if self.local_state(page) == INVALID:
            return b""  # never touched: zeros
        return ctypes.string_at(self.host(page), PAGE)

    def _view(self, first: int, count: int) -> memoryview:
        """`count` present pages from `first` in guest memory, for sending without a copy."""
        return memoryview((ctypes.c_char * (count * PAGE)).from_address(self.host(first))).cast("B")

    def _install(self, page: int, data: bytes, writable: bool) -> None:
        self.uffd.install(self.host(page), data or None, writable)
        self.state[self._slot(page)] = MODIFIED if writable else SHARED

    def _protect(self, page: int) -> None:
        if self.local_state(page) == MODIFIED:
            self.uffd.protect(self.host(page))
            self.state[self._slot(page)] = SHARED

    def _drop(self, page: int) -> None:
        if self.local_state(page) != INVALID:
            self.uffd.drop(self.host(page))
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
        stream = self._streams.get(fault.thread)
        if stream is None:
            stream = self._streams[fault.thread] = ReadAhead(self.readahead)
        home_range = self.homes.range_of(page)
        home, end = home_range.index, home_range.end // PAGE
        if state == INVALID and (wait := stream.in_flight(page)) is not None:
            wait()  # a window asked for ahead of the guest holds this page: its grant is in
            self.counters.prefetch_waits += 1
            stream.caught_up()
            self._prefetch(stream, home, page, end)  # the guest keeps up: keep the pipe full
            state = self.local_state(page)
        if state == MODIFIED or (state == SHARED and not wants_write):
            self.uffd.wake(fault.address)  # already resolved by an earlier event
            return
        self.counters.page_faults += 1
        kind = Kind.WRITE if wants_write else Kind.READ
        window, sequential = (1, False)
        if state == INVALID:
            window, sequential = stream.on_fault(page, end - page)
        if home == self.index:
            if state != INVALID or not self._serve_own_run(kind, page, window, sequential):
                self.serve(self.index, kind, page, request_id=0)
            return
        wait = self.submit(home, _request(kind, page, window, migrate=sequential))
        if sequential and kind == Kind.READ and stream.depth:
            self._prefetch(stream, home, page, end)
        wait()  # the grant is applied by the reader
        self.counters.remote_faults += 1
        if len(self.counters.remote_fault_seconds) < MAX_SAMPLES:
            # From reading the fault to the page installed by the reader thread.
            self.counters.remote_fault_seconds.append(self._installed_at - fault.read_at)

    def _prefetch(self, stream: ReadAhead, home: int, page: int, end: int) -> None:
        """Ask `home` for the windows of a sequential run the guest will reach next, up to
        page `end` (the end of the home range): READs whose grants the reader applies; the
        fault thread waits for one only if the guest faults on a page in it before it
        arrived."""
        for first, count in stream.prefetch(page, end):
            request = _request(Kind.READ, first, count, migrate=True)
            stream.sent(first, count, self.submit(home, request))

    def _serve_own_run(self, kind: Kind, page: int, window: int, sequential: bool) -> bool:
        """A fault of this fragment's own vCPUs on a missing page homed here: resolve it with
        the following pages of a read-ahead window when that costs no other fragment more
        than the page alone. Untouched pages become Modified zero pages here, in one ioctl;
        for a read, pages one other fragment owns come back in one batched DOWNGRADE (a
        sequential run takes them back: the owner gives them up, see `_downgrade_run`). False
        when the page is neither (serve() then handles it alone)."""
        me = self.index
        with self.locks[page % LOCK_STRIPES]:
            owner = self.owner.get(page, me)
            if self.local_state(page) != INVALID or owner == NO_OWNER:
                return False
            if owner != me and kind == Kind.WRITE:
                return False
            if owner != me and not sequential:
                window = 1  # take more of a writer's pages only for a sequential run
            with self._run_locked(page, window, owner) as run:
                if owner == me:  # untouched everywhere (no copy exists): zeros
                    self.uffd.install(self.host(page), None, writable=True, pages=run)
                    self._set_states(page, run, MODIFIED)
                else:
                    take = sequential and self.moved.isdisjoint(range(page, page + run))
                    self._downgrade_run(owner, page, run, take=take)
            return True

    @contextlib.contextmanager
    def _run_locked(self, first: int, window: int, owner: int) -> Iterator[int]:
        """Lock the pages after `first` (whose lock the caller holds), up to `window` pages in
        all, while each lock is free and the page is owned by `owner` with no copy on this
        fragment; yields the run's length, `first` included. Released on exit."""
        held: list[threading.Lock] = []
        try:
            run = 1
            while run < window:
                page = first + run
                lock = self.locks[page % LOCK_STRIPES]
                if not lock.acquire(blocking=False):
                    break
                if self.owner.get(page, self.index) != owner or self.local_state(page) != INVALID:
                    lock.release()
                    break
                held.append(lock)
                run += 1
            yield run
        finally:
            for lock in held:
                lock.release()

    def _downgrade_run(self, owner: int, first: int, count: int, take: bool = False) -> None:
        """Bring `count` pages from `first` that `owner` holds Modified home as Shared copies
        (the owner keeps them write-protected), with one DOWNGRADE; with `take` (this
        fragment's own sequential read) as Modified pages of this fragment, the owner giving
        them up (DOWNGRADE+MIGRATE, or INVALIDATE+data for one page), each page's version
        counting the change: a Shared install is write-protected, and the guest's first read
        of such a page is KVM's slow path. Page locks are held. CoherenceError if the reply
        is short or a page comes back at another version than the directory's (an update
        was lost)."""
        me = self.index
        if count > 1:
            flags = BATCH | (MIGRATE if take else 0)
            directive = Frame(Kind.DOWNGRADE, flags, page=first, payload=struct.pack("<H", count))
        elif take:
            directive = Frame(Kind.INVALIDATE, WANT_DATA, page=first)
        else:
            directive = Frame(Kind.DOWNGRADE, page=first)
        reply = self.request(owner, directive)
        offset = 0 if count == 1 else 4 * count  # a batch: the versions, then the data
        if len(reply.payload) != offset + count * PAGE:
            raise CoherenceError(
                f"{directive.kind.name} of {count} pages returned {len(reply.payload)} bytes"
            )
        if count == 1:
            versions: tuple[int, ...] = (reply.page_version,)
        else:
            versions = struct.unpack_from(f"<{count}I", reply.payload)
        for page, version in zip(range(first, first + count), versions, strict=True):
            self._check_returned(page, replace(reply, page_version=version))
        self.uffd.install(self.host(first), reply.payload, take, count, offset=offset)
        self._set_states(first, count, MODIFIED if take else SHARED)
        for page in range(first, first + count):
            if take:
                self._new_owner(page, me)
                self.sharers.pop(page, None)
                self.seen[page] = self.version[page]
            else:
                self.owner[page] = NO_OWNER
                self.sharers[page] = (1 << owner) | (1 << me)
        self.counters.pages_in += count

    # -- the home side ------------------------------------------------------------------------
    def serve(  # noqa: PLR0917 - the fields of one request
        self,
        requester: int,
        kind: Kind,
        page: int,
        request_id: int,
        readahead: int = 1,
        migrate: bool = False,
    ) -> None:
        """Handle READ/WRITE for a page this fragment is home for; grants go out under the lock.
        `migrate`: the READ continues a sequential run (the request's MIGRATE flag)."""
        self._check_home(requester, page)
        with self.locks[page % LOCK_STRIPES]:
            self._serve_locked(requester, kind, page, request_id, readahead, migrate)

    def try_serve_inline(self, requester: int, frame: Frame) -> bool:
        """Serve a request at once (on the connection's reader thread) when its page lock is
        free and no other fragment must act first; False means: queue it for a worker."""
        page = frame.page
        self._check_home(requester, page)
        lock = self.locks[page % LOCK_STRIPES]
        if not lock.acquire(blocking=False):
            return False
        try:
            if not self._local_only(requester, frame.kind, page):
                return False
            self._serve_locked(
                requester, frame.kind, page, frame.request, readahead_count(frame), migrates(frame)
            )
            return True
        finally:
            lock.release()

    def _local_only(self, r: int, kind: Kind, page: int) -> bool:
        """Whether serving needs no directive to another fragment."""
        owner, sharers, me = self.owner.get(page, self.index), self.sharers.get(page, 0), self.index
        if kind == Kind.READ:
            return owner in (me, r, NO_OWNER) or bool(sharers >> r & 1)
        if owner == NO_OWNER:
            return sharers & ~((1 << me) | (1 << r)) == 0
        return owner in (me, r)

    def _check_home(self, requester: int, page: int) -> None:
        try:
            home = self.homes.home(page)
        except KeyError:
            raise CoherenceError(
                f"fragment {requester} asked for page {page:#x}, which is not coherent memory"
            ) from None
        if home != self.index:
            raise CoherenceError(
                f"fragment {requester} asked fragment {self.index} for page {page:#x},"
                " which is homed elsewhere"
            )

    def _serve_locked(  # noqa: PLR0917 - the fields of one request
        self, r: int, kind: Kind, page: int, request_id: int, readahead: int, migrate: bool = False
    ) -> None:
        if kind == Kind.READ:
            self._serve_read(r, page, request_id, readahead, migrate)
        else:
            self._serve_write(r, page, request_id, readahead)

    def _grant(self, requester: int, page: int, request_id: int, flags: int, data: bytes) -> None:
        if requester == self.index:
            return
        if flags & HAS_DATA:
            self.counters.pages_out += 1
        version = self.version.get(page, 0)
        self.send(requester, Frame(Kind.GRANT, flags, request_id, page, data, version))

    def _new_owner(self, page: int, owner: int) -> None:
        self.owner[page] = owner
        self.version[page] = self.version.get(page, 0) + 1
        self.moved.discard(page)  # a move records itself after this (`_send_grant`)

    def _check_returned(self, page: int, reply: Frame) -> None:
        """The owner's copy must be the directory's newest version."""
        expected = self.version.get(page, 0)
        if reply.page_version != expected:
            raise CoherenceError(
                f"page {page:#x} came back at version {reply.page_version}, directory has"
                f" {expected}: an update was lost"
            )
        self.seen[page] = expected

    def _virgin(self, page: int) -> bool:
        """Owned by its home and never touched anywhere: all zeros, no copy exists."""
        return self.owner.get(page, self.index) == self.index and self.local_state(page) == INVALID

    def _serve_read(
        self, r: int, page: int, request_id: int, window: int = 1, migrate: bool = False
    ) -> None:
        me, bit = self.index, 1 << r
        owner = self.owner.get(page, me)
        sharers = self.sharers.get(page, 0)
        if owner == r or sharers & bit:  # a repeated request: it has the page already
            if r == me and self.local_state(page) == INVALID:
                self._install(page, b"", writable=owner == me)  # first touch of a home page
            self._grant(r, page, request_id, EXCLUSIVE if owner == r else 0, b"")
            return
        if r != me and self._virgin(page):
            # First touch anywhere: the (zero) page moves to its first user; no data travels.
            self._new_owner(page, r)
            self._send_grant(r, page, request_id, EXCLUSIVE | HAS_DATA, b"", window, False)
            return
        if migrate and r != me and owner == me and self.local_state(page) == MODIFIED:
            # A sequential reader takes the run the home alone holds: the page moves with it.
            self._new_owner(page, r)
            self.sharers.pop(page, None)
            flags = EXCLUSIVE | HAS_DATA
            self._send_grant(
                r, page, request_id, flags, b"", window, False, migrate=True, first_moves=True
            )
            return
        if owner != NO_OWNER:
            if owner == me:
                if self.local_state(page) == INVALID:
                    self._install(page, b"", writable=False)
                else:
                    self._protect(page)
            else:
                with self._run_locked(page, window, owner) as run:
                    self._downgrade_run(owner, page, run)
                    self.sharers[page] |= bit
                    data = self._data(page)
                    self._send_grant(r, page, request_id, HAS_DATA, data, window, False, run)
                return
            sharers, owner = (1 << owner) | (1 << me), NO_OWNER
        self.owner[page] = NO_OWNER
        self.sharers[page] = sharers | bit
        data = self._data(page)
        self._send_grant(r, page, request_id, HAS_DATA, data, window, False, migrate=migrate)

    def _send_grant(  # noqa: PLR0917 - the fields of one grant
        self,
        r: int,
        first: int,
        request_id: int,
        flags: int,
        data: bytes,
        window: int,
        writes: bool,
        locked: int = 1,
        *,
        migrate: bool = False,
        first_moves: bool = False,
    ) -> None:
        """Grant `first`, plus (read-ahead) those of the next `window - 1` pages that cost no
        other fragment anything: untouched pages move to r as exclusive zero pages; for reads,
        pages the home owns or shares become Shared by r, except that with `migrate` (a
        sequential run) pages the home alone holds Modified move to r exclusively: the home
        write-protects, copies and drops them before the grant leaves (`first_moves`: so does
        `first`, whose data the caller leaves to this). One message carries them all. The
        caller holds the locks of the first `locked` pages."""
        if r == self.index:
            return
        me, owners, sharers_of, state = self.index, self.owner, self.sharers, self.state
        base = self._slot(first)  # a window lies in one home range: consecutive slots
        if (window <= 1 and not first_moves) or not flags & HAS_DATA:
            self._grant(r, first, request_id, flags, data)
            return
        window = min(window, self._room(first))  # never a page homed elsewhere
        included, exclusive, zero = 1, int(bool(flags & EXCLUSIVE)), int(not data)
        versions = [self.version.get(first, 0)]
        shared: list[int] = []  # pages r will share with the home
        moved: list[int] = [first] if first_moves else []  # pages that move from the home to r
        if first_moves:
            zero = 0
        held: list[threading.Lock] = []
        try:
            if migrate and self._move_all(r, first, window, locked, held):
                rest = range(first + 1, first + window)
                included |= (1 << window) - 2
                exclusive |= (1 << window) - 2
                moved.extend(rest)
                versions.extend(map(self.version.__getitem__, rest))
            else:
                for offset in range(1, window):
                    page, bit = first + offset, 1 << offset
                    if offset >= locked:
                        lock = self.locks[page % LOCK_STRIPES]
                        if not lock.acquire(blocking=False):
                            continue
                        held.append(lock)
                    owner, sharers = owners.get(page, me), sharers_of.get(page, 0)
                    if owner == r or sharers >> r & 1:
                        continue
                    if owner == me and state[base + offset] == INVALID:  # untouched anywhere
                        self._new_owner(page, r)
                        included, exclusive, zero = included | bit, exclusive | bit, zero | bit
                    elif migrate and owner == me and state[base + offset] == MODIFIED:
                        self._new_owner(page, r)  # the home's copy is the only one
                        included, exclusive = included | bit, exclusive | bit
                        moved.append(page)
                    elif not writes and owner in (me, NO_OWNER):
                        owners[page] = NO_OWNER
                        sharers_of[page] = (1 << me if owner == me else sharers) | (1 << r)
                        included |= bit
                        shared.append(page)
                    else:
                        continue
                    versions.append(self.version.get(page, 0))
            self.moved.update(moved)
            self._protect_pages([p for p in shared if state[base + p - first] == MODIFIED] + moved)
            self.counters.pages_out += bool(data) + len(shared) + len(moved)
            payload = (
                BATCH_HEADER.pack(included, exclusive, zero)
                + struct.pack(f"<{len(versions)}I", *versions)
                + data
            )
            # Shared pages go out from guest memory (write-protected, locked until sent); moved
            # pages are copied out (write-protected first, so no write is lost) and dropped
            # here before the grant leaves (revocation before grant).
            pages = tuple(self._grant_chunks(shared, moved))
            self.send(r, Frame(Kind.GRANT, flags | BATCH, request_id, first, payload, 0, pages))
        finally:
            for lock in held:
                lock.release()

    def _move_all(
        self, r: int, first: int, window: int, locked: int, held: list[threading.Lock]
    ) -> bool:
        """The common case of a sequential reader's window, decided at once: when every page
        after `first` (up to `window`, already clipped to the home range) is Modified here
        with no other holder (owned by the home, no sharers) and its lock is free, the
        directory gives them all to r (owner and version: the same decision `_send_grant`
        makes page by page, which then copies, drops and records them). The locks taken join
        `held`; False, with no lock kept and nothing changed, otherwise."""
        if window <= 1:
            return False
        rest = range(first + 1, first + window)
        taken: list[threading.Lock] = []
        for page in rest[locked - 1 :]:  # the caller holds the locks of the first `locked`
            lock = self.locks[page % LOCK_STRIPES]
            if not lock.acquire(blocking=False):
                break
            taken.append(lock)
        base, me, owners, sharers = self._slot(first), self.index, self.owner, self.sharers
        if (
            len(taken) != len(rest) - (locked - 1)
            or self.state.count(MODIFIED, base + 1, base + window) != window - 1
            # owned by the home (no entry: never changed) with no sharer; checked in C when
            # the pages have no entries, as most do
            or (not owners.keys().isdisjoint(rest) and any(owners.get(p, me) != me for p in rest))
            or (not sharers.keys().isdisjoint(rest) and any(sharers.get(p, 0) for p in rest))
        ):
            for lock in taken:
                lock.release()
            return False
        held.extend(taken)
        self.owner.update(dict.fromkeys(rest, r))
        if self.version.keys().isdisjoint(rest):  # first change of owner for them all
            self.version.update(dict.fromkeys(rest, 1))
        else:
            for page in rest:
                self.version[page] = self.version.get(page, 0) + 1
        return True

    def _grant_chunks(self, shared: list[int], moved: list[int]) -> Iterator[memoryview]:
        """The data of a batched grant's pages that are not in its payload already (all but
        `first`, or all with `first_moves`), in page order: views of the shared pages' guest
        memory, copies of the moved pages (dropped here once copied)."""
        chunks = [(p, self._view(p, n)) for p, n in _runs(shared)]
        chunks += [(p, self._hand_over(p, n)) for p, n in _runs(moved)]
        for _, chunk in sorted(chunks, key=lambda c: c[0]):
            yield chunk

    def _hand_over(self, first: int, count: int) -> memoryview:
        """A copy of `count` write-protected pages from `first` that leave this fragment with
        their data (MIGRATE), which then drops them (`_give_up`)."""
        data = memoryview(bytes(self._view(first, count)))
        self._give_up(first, count)
        return data

    def _give_up(self, first: int, count: int) -> None:
        """Drop this fragment's copies of pages that moved to another one (one madvise)."""
        self.uffd.drop(self.host(first), count)
        self._set_states(first, count, INVALID)
        self.counters.invalidations += count
        self.counters.pages_moved += count

    def _protect_pages(self, pages: list[int]) -> None:
        """Write-protect Modified pages, one ioctl per contiguous run (each is a TLB flush)."""
        for run_start, run in _runs(pages):
            self.uffd.protect(self.host(run_start), run)
            self._set_states(run_start, run, SHARED)

    def _serve_write(self, r: int, page: int, request_id: int, window: int = 1) -> None:
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
                self._check_returned(page, reply)
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
        self._new_owner(page, r)
        self.sharers[page] = 0
        if r == me:
            self.seen[page] = self.version[page]
            if had_copy:
                self._unprotect(page)
            else:
                self._install(page, data, writable=True)
            return
        if had_copy:
            self._grant(r, page, request_id, EXCLUSIVE, b"")
        else:
            self._send_grant(r, page, request_id, EXCLUSIVE | HAS_DATA, data, window, True)

    # -- directives and grants from a home (a reader thread, in connection order) -----------
    def on_directive(self, frame: Frame) -> Frame:
        """DOWNGRADE or INVALIDATE from the page's home; returns the reply."""
        page = frame.page
        if frame.flags & BATCH:
            return self._downgrade_batch(frame)
        state = self.local_state(page)
        downgrade = frame.kind == Kind.DOWNGRADE
        if downgrade or frame.flags & WANT_DATA:  # the owner hands its copy to the home
            if state != MODIFIED:
                what = "DOWNGRADE" if downgrade else "INVALIDATE+data"
                raise CoherenceError(
                    f"{what} of page {page:#x} that fragment {self.index} does not own"
                )
            self._protect(page)  # no guest write may slip in between the read and the reply
            data = self._data(page)
            if not downgrade:
                self._drop(page)
            self.counters.pages_out += 1
            return Frame(
                Kind.DATA,
                request=frame.request,
                page=page,
                payload=data,
                page_version=self.seen.get(page, 0),
            )
        self._drop(page)
        return Frame(Kind.ACK, request=frame.request, page=page)

    def _downgrade_batch(self, frame: Frame) -> Frame:
        """A batched DOWNGRADE: write-protect every page of the run (one ioctl), then return
        their versions and data in one DATA frame; with MIGRATE (the home takes the run) the
        data is copied out and the pages dropped here before the reply leaves."""
        first, count = frame.page, readahead_count(frame)
        pages = range(first, first + count)
        if frame.kind != Kind.DOWNGRADE or any(self.local_state(p) != MODIFIED for p in pages):
            raise CoherenceError(
                f"batched {frame.kind.name} of pages {first:#x}+{count} that fragment"
                f" {self.index} does not all own"
            )
        self._protect_pages(list(pages))
        versions = struct.pack(f"<{count}I", *(self.seen.get(p, 0) for p in pages))
        self.counters.pages_out += count
        if frame.flags & MIGRATE:
            data = (self._hand_over(first, count),)
        else:
            # Sent from guest memory by this reader before it reads the next directive: nothing
            # changes the pages meanwhile (write-protected; only their home's directives drop).
            data = (self._view(first, count),)
        return Frame(Kind.DATA, BATCH, frame.request, first, versions, 0, data)

    def on_grant(self, frame: Frame) -> None:
        """Apply a GRANT before the waiting fault handler resumes."""
        self._installed_at = time.perf_counter()  # overwritten below once installed
        try:
            self._apply_grant(frame)
        finally:
            self._installed_at = time.perf_counter()

    def _apply_grant(self, frame: Frame) -> None:
        if frame.flags & BATCH:
            self._apply_batch(frame)
            return
        page, exclusive = frame.page, bool(frame.flags & EXCLUSIVE)
        self._accept_version(page, frame.page_version)
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

    def _accept_version(self, page: int, version: int) -> None:
        if version < self.seen.get(page, 0):
            raise CoherenceError(
                f"stale grant of page {page:#x}: version {version} after {self.seen[page]}"
            )
        self.seen[page] = version

    def _apply_batch(self, frame: Frame) -> None:
        """Install a batched grant, one UFFDIO_COPY per run of pages of the same kind."""
        included, exclusive, zero = BATCH_HEADER.unpack_from(frame.payload)
        count = included.bit_count()
        versions = struct.unpack_from(f"<{count}I", frame.payload, BATCH_HEADER.size)
        offset = BATCH_HEADER.size + 4 * count
        pages = [frame.page + b for b in range(included.bit_length()) if included >> b & 1]
        seen = self.seen
        if seen.keys().isdisjoint(pages):  # the common case: none applied before, none stale
            seen.update(zip(pages, versions, strict=True))
        else:
            for page, version in zip(pages, versions, strict=True):
                self._accept_version(page, version)
        runs = list(_kind_runs(included, exclusive, zero))
        for bit, run, _, _ in runs:  # all checked before any is installed, as versions are
            slot = self._slot(frame.page + bit)
            if self.state.count(INVALID, slot, slot + run) != run:
                held = next(p for p in range(slot, slot + run) if self.state[p])
                raise CoherenceError(
                    f"batched grant of page {frame.page + bit + held - slot:#x} already held"
                    f" by fragment {self.index}"
                )
        for bit, run, writable, zeros in runs:
            first = frame.page + bit
            if zeros:
                self.uffd.install(self.host(first), None, writable=writable, pages=run)
            else:
                self.uffd.install(self.host(first), frame.payload, writable, run, offset)
                offset += run * PAGE
            self._set_states(first, run, MODIFIED if writable else SHARED)
            self.counters.pages_in += run

    def _room(self, page: int) -> int:
        """Pages from `page` to the end of its home range (a window stays within one home)."""
        try:
            return self.homes.range_of(page).end // PAGE - page
        except KeyError:
            return 1


def _request(kind: Kind, page: int, window: int, migrate: bool = False) -> Frame:
    """A READ or WRITE for `page` and, beside it, up to `window - 1` following pages; a READ
    that continues a sequential run (`migrate`) lets the pages only the home holds move."""
    if window <= 1:
        return Frame(kind, page=page)
    flags = BATCH | (MIGRATE if migrate and kind == Kind.READ else 0)
    return Frame(kind, flags, page=page, payload=struct.pack("<H", window))


def migrates(frame: Frame) -> bool:
    """Whether a READ continues a sequential run (its pages may move, see `_send_grant`)."""
    return frame.kind == Kind.READ and bool(frame.flags & MIGRATE)


def readahead_count(frame: Frame) -> int:
    """The read-ahead window a request asks for (1 when it carries none)."""
    if frame.flags & BATCH and len(frame.payload) >= 2:
        return max(1, min(64, int(struct.unpack_from("<H", frame.payload)[0])))
    return 1


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """(first, length) of each run of consecutive page numbers, in order; `pages` must be
    distinct (every caller's are)."""
    if not pages:
        return []
    ordered = sorted(pages)
    if ordered[-1] - ordered[0] + 1 == len(ordered):  # distinct pages: one run (a window's)
        return [(ordered[0], len(ordered))]
    runs: list[tuple[int, int]] = []
    start = previous = ordered[0]
    for page in ordered[1:]:
        if page != previous + 1:
            runs.append((start, previous - start + 1))
            start = page
        previous = page
    runs.append((start, previous - start + 1))
    return runs


def _kind_runs(included: int, exclusive: int, zero: int) -> Iterator[tuple[int, int, bool, bool]]:
    """(first bit, length, exclusive, zero-filled) of each run of included bits of one kind in
    a batched grant's bitmaps, in order; a whole window of one kind (the common case) at once."""
    if included & (included + 1) == 0 and exclusive in (0, included) and zero in (0, included):
        if included:  # bits 0..n-1, all of one kind
            yield 0, included.bit_length(), bool(exclusive), bool(zero)
        return
    bit = 0
    while bit < 64:
        if not included >> bit & 1:
            bit += 1
            continue
        kind = (exclusive >> bit & 1, zero >> bit & 1)
        end = bit + 1
        while end < 64 and included >> end & 1 and (exclusive >> end & 1, zero >> end & 1) == kind:
            end += 1
        yield bit, end - bit, bool(kind[0]), bool(kind[1])
        bit = end
