"""The coherence protocol's state machine at one home, driven frame by frame.

Guest RAM and userfaultfd are real (an anonymous mapping registered like a fragment's); the
other fragments are played by the test: it records what the home sends them and answers the
home's requests as they would.
"""

import ctypes
import itertools
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from spanvm.fabric.coherence import (
    BATCH_HEADER,
    INVALID,
    MODIFIED,
    SHARED,
    Coherence,
    CoherenceError,
    _kind_runs,
)
from spanvm.fabric.homes import HomeMap, HomeRange
from spanvm.fabric.uffd import PAGE_SIZE, Userfault
from spanvm.fabric.wire import BATCH, EXCLUSIVE, HAS_DATA, MIGRATE, WANT_DATA, Frame, Kind
from spanvm.vmm.layout import IMAGE_BASE
from spanvm.vmm.memory import GuestMemory

MiB = 1 << 20
PAGE = (4 * MiB) // PAGE_SIZE  # a page in the coherent region


@dataclass
class Peers:
    """Fragments 1 and 2 as the home sees them: what they were sent, how they answer."""

    sent: list[tuple[int, Frame]] = field(default_factory=list)
    requests: list[tuple[int, Frame]] = field(default_factory=list)
    owner_version: int | None = None  # what an owner claims when it hands a page back

    def send(self, peer: int, frame: Frame) -> None:
        self.sent.append((peer, frame))

    def request(self, peer: int, frame: Frame) -> Frame:
        self.requests.append((peer, frame))
        if frame.kind == Kind.INVALIDATE and not frame.flags & WANT_DATA:
            return Frame(Kind.ACK, page=frame.page)
        version = (
            self.owner_version if self.owner_version is not None else self._granted(frame.page)
        )
        return Frame(Kind.DATA, page=frame.page, payload=b"\xab" * PAGE_SIZE, page_version=version)

    def _granted(self, page: int) -> int:
        grants = [f for _, f in self.sent if f.kind == Kind.GRANT and f.page == page]
        return grants[-1].page_version if grants else 0


@pytest.fixture
def home() -> Iterator[tuple[Coherence, Peers]]:
    memory = GuestMemory(32 * MiB)
    start = memory.host_address + IMAGE_BASE
    uffd = Userfault(start, memory.size - IMAGE_BASE)
    peers = Peers()
    homes = HomeMap([HomeRange(IMAGE_BASE, 16 * MiB, 0), HomeRange(16 * MiB, 32 * MiB, 1)])
    coherence = Coherence(
        0,
        memory=memory,
        uffd=uffd,
        homes=homes,
        send=peers.send,
        request=peers.request,
        readahead=1,
    )
    try:
        yield coherence, peers
    finally:
        uffd.close()
        memory.close()


def test_first_touch_moves_a_zero_page_without_data(home: tuple[Coherence, Peers]) -> None:
    coherence, peers = home
    coherence.serve(1, Kind.READ, PAGE, request_id=7)
    ((peer, grant),) = peers.sent
    assert peer == 1 and grant.kind == Kind.GRANT and grant.request == 7
    assert grant.flags == EXCLUSIVE | HAS_DATA and grant.payload == b"" and grant.page_version == 1
    assert coherence.owner[PAGE] == 1 and not peers.requests


def test_write_invalidates_every_other_sharer_first(home: tuple[Coherence, Peers]) -> None:
    coherence, peers = home
    coherence.serve(0, Kind.WRITE, PAGE, request_id=0)  # the home writes: Modified here
    assert coherence.local_state(PAGE) == MODIFIED
    coherence.serve(1, Kind.READ, PAGE, request_id=1)  # 1 reads: home and 1 share it
    assert coherence.local_state(PAGE) == SHARED and coherence.sharers[PAGE] == 0b011
    coherence.serve(2, Kind.WRITE, PAGE, request_id=2)  # 2 writes: 1 and the home drop it
    assert [(p, f.kind, f.flags) for p, f in peers.requests] == [(1, Kind.INVALIDATE, 0)]
    grant = peers.sent[-1][1]
    assert (
        peers.sent[-1][0] == 2
        and grant.flags == EXCLUSIVE | HAS_DATA
        and len(grant.payload) == PAGE_SIZE
    )
    assert coherence.owner[PAGE] == 2 and coherence.local_state(PAGE) == 0
    versions = [f.page_version for _, f in peers.sent]
    assert versions == sorted(versions) and versions[-1] > versions[0]


def test_read_of_a_page_owned_elsewhere_downgrades_the_owner(home: tuple[Coherence, Peers]) -> None:
    coherence, peers = home
    coherence.serve(2, Kind.WRITE, PAGE, request_id=1)
    coherence.serve(1, Kind.READ, PAGE, request_id=2)
    assert [(p, f.kind) for p, f in peers.requests] == [(2, Kind.DOWNGRADE)]
    assert coherence.sharers[PAGE] == 0b111 and coherence.local_state(PAGE) == SHARED
    assert peers.sent[-1][1].payload == b"\xab" * PAGE_SIZE  # the owner's data, passed on


def test_an_owner_returning_an_old_version_stops_the_vm(home: tuple[Coherence, Peers]) -> None:
    coherence, peers = home
    coherence.serve(2, Kind.WRITE, PAGE, request_id=1)  # version 1 at fragment 2
    peers.owner_version = 0  # ... which hands back a copy older than it was granted
    with pytest.raises(CoherenceError, match="an update was lost"):
        coherence.serve(1, Kind.READ, PAGE, request_id=2)


def test_a_stale_grant_is_refused(home: tuple[Coherence, Peers]) -> None:
    coherence, _ = home
    other = PAGE + 1
    coherence.on_grant(Frame(Kind.GRANT, EXCLUSIVE | HAS_DATA, 1, other, b"", page_version=5))
    coherence.on_directive(Frame(Kind.INVALIDATE, 0, 2, other))
    with pytest.raises(CoherenceError, match=r"stale grant .* version 3 after 5"):
        coherence.on_grant(Frame(Kind.GRANT, EXCLUSIVE | HAS_DATA, 3, other, b"", page_version=3))


def test_requests_for_pages_homed_elsewhere_are_refused(home: tuple[Coherence, Peers]) -> None:
    coherence, _ = home
    with pytest.raises(CoherenceError, match="which is homed elsewhere"):
        coherence.serve(1, Kind.READ, (20 * MiB) // PAGE_SIZE, request_id=1)
    with pytest.raises(CoherenceError, match="which is not coherent memory"):
        coherence.serve(1, Kind.READ, (64 * MiB) // PAGE_SIZE, request_id=1)


def _written_by_the_home(coherence: Coherence, count: int) -> list[bytes]:
    """The home's vCPUs write `count` pages from PAGE (Modified here); their contents."""
    contents = []
    for n in range(count):
        coherence.serve(0, Kind.WRITE, PAGE + n, request_id=0)
        data = bytes([n + 1]) * PAGE_SIZE
        ctypes.memmove(coherence.host(PAGE + n), data, PAGE_SIZE)
        contents.append(data)
    return contents


def _batch(grant: Frame) -> tuple[int, int, int, list[int], bytes]:
    included, exclusive, zero = BATCH_HEADER.unpack_from(grant.payload)
    count = included.bit_count()
    versions = list(struct.unpack_from(f"<{count}I", grant.payload, BATCH_HEADER.size))
    data = grant.payload[BATCH_HEADER.size + 4 * count :] + b"".join(grant.chunks)
    return included, exclusive, zero, versions, data


@pytest.mark.parametrize(("migrate", "shared"), [(True, True), (True, False), (False, True)])
def test_a_sequential_reader_takes_the_pages_only_the_home_holds(
    home: tuple[Coherence, Peers], migrate: bool, shared: bool
) -> None:
    """MIGRATE (a READ window of a sequential run): pages the home alone holds Modified move
    to the reader, exclusive and writable, and the home drops its copies before the grant
    leaves; a page another fragment shares stays shared (decided page by page; without one,
    the whole window at once). Without MIGRATE all are shared."""
    coherence, peers = home
    contents = _written_by_the_home(coherence, 8)
    if shared:
        coherence.serve(2, Kind.READ, PAGE + 5, request_id=1)  # fragment 2 shares page 5
    peers.sent.clear()
    coherence.serve(1, Kind.READ, PAGE, request_id=9, readahead=8, migrate=migrate)
    ((peer, grant),) = peers.sent
    assert peer == 1 and grant.kind == Kind.GRANT and grant.flags & (BATCH | HAS_DATA)
    included, exclusive, zero, versions, data = _batch(grant)
    assert included == 0xFF and zero == 0
    assert data == b"".join(contents)  # every page's latest bytes, in page order
    stays = {5} if shared else set()
    if migrate:
        assert exclusive == 0xFF & ~sum(1 << n for n in stays)
        assert grant.flags & EXCLUSIVE  # the faulting page itself moved too
        for n in set(range(8)) - stays:
            assert coherence.owner[PAGE + n] == 1 and coherence.local_state(PAGE + n) == INVALID
            assert versions[n] == coherence.version[PAGE + n] == 1  # its first change of owner
        assert coherence.counters.pages_moved == 8 - len(stays)
    else:
        assert exclusive == 0
        assert all(coherence.local_state(PAGE + n) == SHARED for n in range(8))
        assert coherence.counters.pages_moved == 0
    if shared:
        assert coherence.sharers[PAGE + 5] == 0b111 and coherence.local_state(PAGE + 5) == SHARED


def test_a_moved_page_read_again_at_home_comes_back_from_its_new_owner(
    home: tuple[Coherence, Peers],
) -> None:
    """After a page moved to a sequential reader, the home's own read downgrades the reader."""
    coherence, peers = home
    _written_by_the_home(coherence, 4)
    coherence.serve(1, Kind.READ, PAGE, request_id=9, readahead=4, migrate=True)
    assert coherence.local_state(PAGE + 2) == INVALID
    peers.owner_version = coherence.version[PAGE + 2]  # what the batched grant gave it
    coherence.serve(0, Kind.READ, PAGE + 2, request_id=0)
    assert [(p, f.kind, f.page) for p, f in peers.requests] == [(1, Kind.DOWNGRADE, PAGE + 2)]
    assert coherence.local_state(PAGE + 2) == SHARED and coherence.sharers[PAGE + 2] == 0b011


def test_a_homes_scan_takes_back_a_run_its_owner_wrote(home: tuple[Coherence, Peers]) -> None:
    """The home's own sequential read of pages another fragment wrote: one DOWNGRADE+MIGRATE;
    the pages come back Modified here, the directory names the home, each version counts
    the change and the home has seen it."""
    coherence, peers = home
    for n in range(4):
        coherence.serve(2, Kind.WRITE, PAGE + n, request_id=n)  # fragment 2 writes 4 pages
    taken = [(PAGE + n, coherence.version[PAGE + n]) for n in range(4)]
    payload = struct.pack("<4I", *(v for _, v in taken)) + b"".join(
        bytes([n + 7]) * PAGE_SIZE for n in range(4)
    )

    def owner_gives_up(peer: int, frame: Frame) -> Frame:
        peers.requests.append((peer, frame))
        return Frame(Kind.DATA, BATCH, frame.request, frame.page, payload)

    coherence.request = owner_gives_up
    assert coherence._serve_own_run(Kind.READ, PAGE, window=4, sequential=True)
    ((peer, directive),) = peers.requests
    assert peer == 2 and directive.kind == Kind.DOWNGRADE
    assert directive.flags == BATCH | MIGRATE and directive.page == PAGE
    for n, (page, version) in enumerate(taken):
        assert coherence.local_state(page) == MODIFIED and coherence.owner[page] == 0
        assert coherence.version[page] == coherence.seen[page] == version + 1
        assert ctypes.string_at(coherence.host(page), 1) == bytes([n + 7])
    assert not any(coherence.sharers.get(page) for page, _ in taken)


def test_a_homes_scan_shares_pages_that_moved_rather_than_take_them_back(
    home: tuple[Coherence, Peers],
) -> None:
    """Pages that moved to a sequential reader are shared (plain DOWNGRADE) when the home
    scans them, not taken back: else home and reader would move them on every scan."""
    coherence, peers = home
    _written_by_the_home(coherence, 4)
    coherence.serve(1, Kind.READ, PAGE, request_id=9, readahead=4, migrate=True)
    assert all(coherence.owner[PAGE + n] == 1 for n in range(4))
    assert coherence.moved >= {PAGE + n for n in range(4)}
    peers.owner_version = coherence.version[PAGE]
    assert coherence._serve_own_run(Kind.READ, PAGE, window=1, sequential=True)
    ((peer, directive),) = peers.requests
    assert (peer, directive.kind, directive.flags) == (1, Kind.DOWNGRADE, 0)
    assert coherence.local_state(PAGE) == SHARED and coherence.sharers[PAGE] == 0b011


def test_an_owner_gives_up_a_run_its_home_takes_back(home: tuple[Coherence, Peers]) -> None:
    """The owner's side of DOWNGRADE+MIGRATE: it replies with each page's version and data,
    and keeps no copy (a plain batched DOWNGRADE keeps write-protected ones)."""
    coherence, _ = home
    other = (16 * MiB) // PAGE_SIZE  # pages fragment 1 is home for, that this fragment owns
    for n in range(4):
        coherence.on_grant(Frame(Kind.GRANT, EXCLUSIVE | HAS_DATA, n, other + n, b"", n + 3))
        ctypes.memmove(coherence.host(other + n), bytes([n + 1]) * PAGE_SIZE, PAGE_SIZE)
    payload = struct.pack("<H", 2)
    kept = coherence.on_directive(Frame(Kind.DOWNGRADE, BATCH, 5, other, payload))
    assert [coherence.local_state(other + n) for n in range(2)] == [SHARED, SHARED]
    given = coherence.on_directive(Frame(Kind.DOWNGRADE, BATCH | MIGRATE, 6, other + 2, payload))
    assert [coherence.local_state(other + n) for n in (2, 3)] == [INVALID, INVALID]
    assert coherence.counters.pages_moved == 2
    for reply, first in ((kept, 0), (given, 2)):
        data = reply.payload + b"".join(reply.chunks)
        assert struct.unpack_from("<2I", data) == (first + 3, first + 4)
        assert data[8:] == bytes([first + 1]) * PAGE_SIZE + bytes([first + 2]) * PAGE_SIZE


REMOTE = (20 * MiB) // PAGE_SIZE  # a page homed on fragment 1, as the home fixture sees it


def _batched_grant(included: int, exclusive: int, zero: int, versions: list[int]) -> Frame:
    """A batched GRANT from fragment 1 at REMOTE: every included page that is not zero-filled
    carries bytes of its own bit number (page n: n + 1 repeated)."""
    data = b"".join(
        bytes([n + 1]) * PAGE_SIZE
        for n in range(included.bit_length())
        if included >> n & 1 and not zero >> n & 1
    )
    payload = BATCH_HEADER.pack(included, exclusive, zero)
    payload += struct.pack(f"<{len(versions)}I", *versions) + data
    return Frame(Kind.GRANT, EXCLUSIVE | HAS_DATA | BATCH, 1, REMOTE, payload)


def test_a_batched_grant_installs_each_run_as_its_kind(home: tuple[Coherence, Peers]) -> None:
    """Pages 0-1 move here with data, 2 is an exclusive zero page, 3 is left out, 4 is
    shared: each lands with its own bytes and state, in one install per run."""
    coherence, _ = home
    coherence.on_grant(_batched_grant(0b10111, 0b00111, 0b00100, [1, 1, 1, 2]))
    states = [coherence.local_state(REMOTE + n) for n in range(5)]
    assert states == [MODIFIED, MODIFIED, MODIFIED, INVALID, SHARED]
    for n, expected in ((0, 1), (1, 2), (2, 0), (4, 5)):
        page = ctypes.string_at(coherence.host(REMOTE + n), PAGE_SIZE)
        assert page == bytes([expected]) * PAGE_SIZE, f"page {n}"
    assert [coherence.seen[REMOTE + n] for n in (0, 1, 2, 4)] == [1, 1, 1, 2]
    assert coherence.counters.pages_in == 4


def test_a_batched_grant_with_one_stale_page_installs_nothing(
    home: tuple[Coherence, Peers],
) -> None:
    coherence, _ = home
    one = Frame(Kind.GRANT, EXCLUSIVE | HAS_DATA, 1, REMOTE + 1, b"", page_version=5)
    coherence.on_grant(one)
    coherence.on_directive(Frame(Kind.INVALIDATE, 0, 2, REMOTE + 1))  # dropped at version 5
    with pytest.raises(CoherenceError, match=r"stale grant .* version 3 after 5"):
        coherence.on_grant(_batched_grant(0b11, 0b11, 0, [4, 3]))
    assert coherence.local_state(REMOTE) == INVALID == coherence.local_state(REMOTE + 1)


def test_a_batched_grant_of_a_page_already_held_installs_nothing(
    home: tuple[Coherence, Peers],
) -> None:
    """Page 2 of the batch is held here already: the grant is refused before pages 0-1
    (an earlier run of another kind) are installed."""
    coherence, _ = home
    coherence.on_grant(Frame(Kind.GRANT, EXCLUSIVE | HAS_DATA, 1, REMOTE + 2, b"", 1))
    with pytest.raises(CoherenceError, match=rf"page {REMOTE + 2:#x} already held"):
        coherence.on_grant(_batched_grant(0b111, 0b011, 0, [1, 1, 2]))
    assert coherence.local_state(REMOTE) == INVALID == coherence.local_state(REMOTE + 1)


@pytest.mark.parametrize("seed", range(3))
def test_kind_runs_match_the_bitmaps_bit_by_bit(seed: int) -> None:
    """The runs a batched grant is installed in cover exactly its included bits, in order,
    each of one kind, whether the window is uniform (one run at once) or mixed."""
    rng = random.Random(seed)
    cases = [(0, 0, 0), ((1 << 64) - 1, (1 << 64) - 1, 0), (0xFF, 0, 0xFF), (0xFF, 0xFF, 0x0F)]
    cases += [(0b100, 0b100, 0), (0b1110, 0, 0), (0xFF, 0x0F, 0), (0b1011, 0b1011, 0b1011)]
    cases += [(rng.getrandbits(64), rng.getrandbits(64), rng.getrandbits(64)) for _ in range(300)]
    for _ in range(300):  # whole windows (bits 0..n-1), mostly of one kind
        window = (1 << rng.randint(1, 64)) - 1
        kinds = (0, window, rng.getrandbits(64))
        cases.append((window, rng.choice(kinds), rng.choice(kinds)))
    for included, any_exclusive, any_zero in cases:
        exclusive, zero = any_exclusive & included, any_zero & included
        bits = [
            (b, bool(exclusive >> b & 1), bool(zero >> b & 1))
            for b in range(64)
            if included >> b & 1
        ]
        runs = list(_kind_runs(included, exclusive, zero))
        flattened = [(f + i, w, z) for f, n, w, z in runs for i in range(n)]
        assert flattened == bits
        for (f1, n1, w1, z1), (f2, _, w2, z2) in itertools.pairwise(runs):
            assert f1 + n1 < f2 or (w1, z1) != (w2, z2)  # runs are maximal
