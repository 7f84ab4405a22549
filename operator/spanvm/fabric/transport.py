"""The fabric's TCP transport: authenticated connections to every peer, framed messages,
request/reply matching, heartbeats and failure detection.

Each pair of fragments shares one connection (the higher index connects to the lower), so
every message between two fragments travels in order. A reader thread per peer dispatches
frames: replies complete the waiting request (a GRANT is applied first, in order), directives
are answered inline, requests go to a worker pool, events go to the fragment.
"""

import contextlib
import errno
import itertools
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import BinaryIO, cast

from spanvm.fabric.wire import (
    NO_SHAPE,
    AuthError,
    BusyError,
    Frame,
    Kind,
    ProtocolError,
    handshake_client,
    handshake_server,
    read_frame,
    refuse_busy,
)

log = logging.getLogger("spanvm.fabric")

HEARTBEAT_INTERVAL = 0.5
# A dead peer and a slow one are told apart by whose silence it is. A dead node stops
# acknowledging what we send (a ping every 0.5 s): TCP's user timeout (tcp(7),
# TCP_USER_TIMEOUT) ends the connection after NODE_DEAD_AFTER. A dead process is closed by
# its kernel at once. A peer that is alive but starved (a loaded node) or hung still has its
# kernel acknowledge, so only its own silence counts, for the longer PEER_HUNG_AFTER.
NODE_DEAD_AFTER = 3.0
PEER_HUNG_AFTER = 10.0
REQUEST_TIMEOUT = 15.0
SEND_TIMEOUT = PEER_HUNG_AFTER  # seconds a send may wait for a peer to read
CONNECT_TIMEOUT = 30.0
# Unauthenticated connections (handshakes in flight, one thread each) per listener; more are
# told BUSY and closed at once (connect() retries on BUSY), so idle strangers cost no threads.
MAX_HANDSHAKES = 8


class FabricError(RuntimeError):
    """The fabric cannot go on (a peer is lost, a request timed out): the VM stops."""


class PeerGoneError(FabricError):
    """A send found the connection closed. Not a verdict by itself: the peer may have ended
    the VM in frames still unread, so the connection's reader decides (lost, or an orderly
    STOP/FAILED) once it has read everything up to the end."""


@dataclass
class Peer:
    """One authenticated connection to another fragment."""

    index: int
    sock: socket.socket
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_seen: float = field(default_factory=time.monotonic)
    departed: bool = False  # its reader saw the connection end


@dataclass
class Handlers:
    """What the fragment does with incoming traffic."""

    on_request: Callable[[int, Frame], None]  # READ/WRITE for a page homed here (a worker)
    try_inline: Callable[[int, Frame], bool]  # serve now if no other fragment must act
    on_directive: Callable[[Frame], Frame]  # DOWNGRADE/INVALIDATE -> reply
    on_grant: Callable[[Frame], None]
    on_event: Callable[[int, Frame], None]  # CONSOLE, EXIT, STOP, STARTED, FAILED, INTERRUPT
    on_failure: Callable[[str], None]


class Transport:
    """One fragment's connections."""

    def __init__(
        self, index: int, count: int, secret: bytes, handlers: Handlers, shape: bytes = NO_SHAPE
    ) -> None:
        """`shape`: the VM's shape digest (fabric/shape.py); peers must present the same."""
        self.index, self.count, self.secret, self.handlers = index, count, secret, handlers
        self.shape = shape
        self.peers: dict[int, Peer] = {}
        self._peers_changed = threading.Condition()
        self._pending: dict[int, tuple[int, Future[Frame]]] = {}  # id -> (peer, reply)
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._workers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fabric-home")
        self._closing = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._torn_down = False
        self._end: Frame | None = None  # the STOP or FAILED that ended the VM, for late peers
        self.refused = 0  # handshakes that failed (logged each)
        self.busy_refused = 0  # connections closed at once: MAX_HANDSHAKES were in flight

    # -- setup ------------------------------------------------------------------------------
    def listen(self, host: str, port: int = 0) -> str:
        """Bind the fabric listener; returns its host:port."""
        sock = socket.create_server((host, port), reuse_port=False)
        self._listener = sock
        self._spawn(self._accept_loop, "fabric-accept")
        bound = sock.getsockname()
        return f"{bound[0]}:{bound[1]}"

    def connect(self, endpoints: dict[int, str]) -> None:
        """Connect to the listed peers (those with a lower index), retrying until they listen."""
        for index, endpoint in sorted(endpoints.items()):
            host, port = endpoint.rsplit(":", 1)
            deadline = time.monotonic() + CONNECT_TIMEOUT
            while True:
                if self._closing.is_set():
                    return  # the VM ended while this fragment was still joining
                try:
                    sock = socket.create_connection((host, int(port)), timeout=5)
                except OSError as err:
                    if time.monotonic() > deadline:
                        raise FabricError(
                            f"cannot reach fragment {index} at {endpoint}: {err}"
                        ) from None
                    time.sleep(0.1)
                    continue
                try:
                    peer_index = handshake_client(sock, self.secret, self.index, self.shape)
                    break
                except BusyError:
                    sock.close()
                    if time.monotonic() > deadline:
                        raise FabricError(
                            f"fragment {index} at {endpoint} stayed too busy to accept us"
                        ) from None
                    time.sleep(0.1)
                except (AuthError, ProtocolError, OSError) as err:
                    sock.close()
                    if self._closing.is_set():
                        return
                    raise FabricError(f"fragment {index} at {endpoint}: {err}") from None
            if peer_index != index:
                sock.close()
                raise FabricError(f"{endpoint} is fragment {peer_index}, expected {index}")
            self._add_peer(Peer(index, sock))

    def wait_connected(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Block until every other fragment is connected (or the VM ends first)."""
        deadline = time.monotonic() + timeout
        with self._peers_changed:
            while len(self.peers) < self.count - 1 and not self._closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(self.count)) - set(self.peers) - {self.index})
                    raise FabricError(f"fragments {missing} did not connect within {timeout:.0f}s")
                self._peers_changed.wait(left)
        self._spawn(self._heartbeat_loop, "fabric-heartbeat")

    def _accept_loop(self) -> None:
        """Accept connections; at most MAX_HANDSHAKES are authenticated at once (one thread
        each), the rest are told BUSY and closed at once, counted in `busy_refused` and
        logged the first time."""
        assert self._listener is not None
        slots = threading.BoundedSemaphore(MAX_HANDSHAKES)
        while not self._closing.is_set():
            try:
                sock, address = self._listener.accept()
            except OSError:
                return
            if not slots.acquire(blocking=False):
                refuse_busy(sock)
                sock.close()
                self.busy_refused += 1
                if self.busy_refused == 1:
                    log.warning(
                        "fabric listener of fragment %d: %d handshakes in flight; closing"
                        " further connections at once (first from %s:%s)",
                        self.index,
                        MAX_HANDSHAKES,
                        address[0],
                        address[1],
                    )
                continue
            threading.Thread(
                target=self._admit, args=(sock, address, slots.release), daemon=True
            ).start()

    def _admit(
        self, sock: socket.socket, address: tuple[str, int], done: Callable[[], None]
    ) -> None:
        """Authenticate one accepted connection (calls `done` once it is decided)."""
        try:
            index = handshake_server(sock, self.secret, self.index, self.shape)
            if not 0 <= index < self.count or index == self.index or index in self.peers:
                raise AuthError(f"unexpected fragment index {index}")
        except (AuthError, ProtocolError, OSError, ValueError) as err:
            self.refused += 1
            log.warning("refused fabric connection from %s:%s: %s", address[0], address[1], err)
            sock.close()
            return
        finally:
            done()
        self._add_peer(Peer(index, sock))

    def _add_peer(self, peer: Peer) -> None:
        peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A peer that stops reading must not block a sender for ever (socket(7) SO_SNDTIMEO).
        peer.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT), 0)
        )
        peer.sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(NODE_DEAD_AFTER * 1000)
        )
        with self._peers_changed:
            if self._torn_down:  # close() ran while this connection was being admitted
                peer.sock.close()
                return
            self.peers[peer.index] = peer
            self._peers_changed.notify_all()
            self._spawn(lambda: self._reader(peer), f"fabric-reader-{peer.index}")
            end = self._end
        if end is not None:
            with contextlib.suppress(PeerGoneError):
                self.send(peer.index, end)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        """Start a thread close() will wait for (it joins only threads already started)."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- sending -------------------------------------------------------------------------------
    def send(self, index: int, frame: Frame) -> None:
        peer = self.peers.get(index)
        if peer is None:
            raise FabricError(f"fragment {index} is not connected")
        buffers = frame.buffers()
        try:
            with peer.lock:
                if len(buffers) == 1:
                    peer.sock.sendall(buffers[0])
                else:
                    _send_all(peer.sock, buffers)
        except OSError as err:
            raise PeerGoneError(f"fragment {index} lost: {err}") from None

    def broadcast(self, frame: Frame) -> None:
        """Send to every peer, ignoring those already gone (used while stopping)."""
        for index in list(self.peers):
            with contextlib.suppress(FabricError):
                self.send(index, frame)

    def request(self, index: int, frame: Frame) -> Frame:
        """Send a request and wait for its reply."""
        return self.submit(index, frame)()

    def submit(self, index: int, frame: Frame) -> Callable[[], Frame]:
        """Send a request without waiting; returns the wait for its reply (to call at most
        once, or never: a reply nobody waits for is dropped by the reader). A GRANT is applied
        by the reader whether or not anyone waits."""
        request_id = next(self._ids)
        future: Future[Frame] = Future()
        with self._pending_lock:
            self._pending[request_id] = (index, future)
        # If the peer is gone, the reply never comes: wait for the reader's verdict, which
        # fails every waiting request with the reason (or the fabric closes).
        try:
            self.send(index, frame.with_request(request_id))
        except PeerGoneError:
            peer = self.peers.get(index)
            if self._torn_down or peer is None or peer.departed:
                with self._pending_lock:
                    self._pending.pop(request_id, None)
                raise  # its reader has ended already: no verdict will wake this request

        def wait() -> Frame:
            try:
                return future.result(REQUEST_TIMEOUT)
            except FutureTimeout:
                raise FabricError(
                    f"fragment {index} did not answer {frame.kind.name} for page"
                    f" {frame.page:#x} within {REQUEST_TIMEOUT:.0f}s"
                ) from None
            finally:
                with self._pending_lock:
                    self._pending.pop(request_id, None)

        return wait

    # -- receiving ---------------------------------------------------------------------------
    def _reader(self, peer: Peer) -> None:
        stream = cast(BinaryIO, peer.sock.makefile("rb", buffering=1 << 16))
        try:
            while True:
                try:
                    frame = read_frame(stream)
                except ProtocolError as err:
                    self._fail(f"fragment {peer.index} sent garbage: {err}")
                    return
                except (OSError, ValueError) as err:  # closed, reset, or closed under us
                    if getattr(err, "errno", None) == errno.ETIMEDOUT:
                        why = f"its node stopped acknowledging for {NODE_DEAD_AFTER:.0f}s"
                        self._fail(f"fragment {peer.index} lost: {why} ({err})")
                    else:
                        self._fail(f"fragment {peer.index} lost: {err}")
                    return
                peer.last_seen = time.monotonic()
                with contextlib.suppress(PeerGoneError):  # read on: its last frames say why
                    self._dispatch(peer, frame)
        except Exception as err:
            self._fail(f"handling traffic from fragment {peer.index}: {err}")
        finally:
            with self._peers_changed:
                peer.departed = True
                self._peers_changed.notify_all()
            # Whatever ended the connection, no reply from this peer will come any more.
            self._fail_pending(f"fragment {peer.index} ended the connection", peer.index)

    def wait_departed(self, timeout: float) -> list[int]:
        """After the VM's end was sent: wait until every peer has closed its side (so each
        read the end before its connection closed); returns those that did not in time."""
        deadline = time.monotonic() + timeout
        with self._peers_changed:
            while True:
                staying = [p.index for p in self.peers.values() if not p.departed]
                left = deadline - time.monotonic()
                if not staying or left <= 0:
                    return staying
                self._peers_changed.wait(left)

    def _dispatch(self, peer: Peer, frame: Frame) -> None:
        kind = frame.kind
        if kind == Kind.PING:
            return
        if kind in (Kind.GRANT, Kind.DATA, Kind.ACK):
            if kind == Kind.GRANT:
                self.handlers.on_grant(frame)
            with self._pending_lock:
                entry = self._pending.pop(frame.request, None)
            if entry is not None:
                with contextlib.suppress(InvalidStateError):  # already failed: too late
                    entry[1].set_result(frame)
            return
        if kind in (Kind.READ, Kind.WRITE):
            if not self.handlers.try_inline(peer.index, frame):
                self._workers.submit(self._serve, peer.index, frame)
            return
        if kind in (Kind.DOWNGRADE, Kind.INVALIDATE):
            self.send(peer.index, self.handlers.on_directive(frame))
            return
        self.handlers.on_event(peer.index, frame)

    def _serve(self, index: int, frame: Frame) -> None:
        try:
            self.handlers.on_request(index, frame)
        except PeerGoneError:
            pass  # the connection's reader reports how the peer ended
        except Exception as err:
            self._fail(
                f"serving {frame.kind.name} of page {frame.page:#x} for fragment {index}: {err}"
            )

    def _heartbeat_loop(self) -> None:
        last_tick = time.monotonic()
        while True:
            ending = self._closing.wait(HEARTBEAT_INTERVAL)
            now = time.monotonic()
            late = now - last_tick - HEARTBEAT_INTERVAL
            last_tick = now
            if late > HEARTBEAT_INTERVAL:
                # This fragment itself did not run (stopped, frozen, starved): its peers'
                # silence over that time is not theirs. Do not count it against them.
                if late > 1.0:
                    log.warning(
                        "fragment %d was frozen for %.1fs; not judging peers on that gap",
                        self.index,
                        late + HEARTBEAT_INTERVAL,
                    )
                for peer in list(self.peers.values()):
                    peer.last_seen += late
            if ending:
                return
            for peer in list(self.peers.values()):
                if now - peer.last_seen > PEER_HUNG_AFTER:
                    self._fail(
                        f"fragment {peer.index} lost: silent for {now - peer.last_seen:.1f}s"
                        " although its node still acknowledges (frozen or hung)"
                    )
                    return
                with contextlib.suppress(PeerGoneError):  # its reader reports how it ended
                    self.send(peer.index, Frame(Kind.PING))

    def _fail(self, message: str) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self.handlers.on_failure(message)  # the cause is recorded before waiters wake
        self._fail_pending(message)

    def _fail_pending(self, message: str, peer: int | None = None) -> None:
        """Wake every request still waiting for a reply (of `peer`, or any), with the reason
        it never comes."""
        with self._pending_lock:
            for index, future in self._pending.values():
                if (peer is None or index == peer) and not future.done():
                    future.set_exception(FabricError(message))

    def announce_end(self, frame: Frame) -> None:
        """The VM is over (STOP or FAILED): tell every peer, including any that connects
        later (a fragment still joining), and treat closing connections as no failure."""
        with self._peers_changed:
            self._end = frame
        self.stopping()
        self.broadcast(frame)

    def stopping(self) -> None:
        """The VM is ending: connections closing from now on are not failures."""
        self._closing.set()
        with self._peers_changed:
            self._peers_changed.notify_all()  # a fragment still joining stops waiting

    # -- teardown ----------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> list[str]:
        """Stop listening, close every connection, fail what still waits, and wait for the
        reader and worker threads to end (they touch guest memory: it must outlive them).
        Returns the names of the threads still running after `timeout` s (then guest memory
        must stay mapped: the caller leaves it to the process's exit)."""
        self._closing.set()
        with self._peers_changed:
            self._torn_down = True
        self._fail_pending("fabric closed")
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for peer in list(self.peers.values()):
            with contextlib.suppress(OSError):
                peer.sock.shutdown(socket.SHUT_RDWR)
            peer.sock.close()
        deadline = time.monotonic() + timeout
        others = [t for t in list(self._threads) if t is not threading.current_thread()]
        for thread in others:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._workers.shutdown(wait=True, cancel_futures=True)
        return [t.name for t in others if t.is_alive()]


def _send_all(sock: socket.socket, buffers: list[bytes | memoryview]) -> None:
    """sendall() of several buffers in order, gathered by the kernel (sendmsg(2))."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]
