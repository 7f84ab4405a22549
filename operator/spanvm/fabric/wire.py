"""The fabric's wire format: framed, versioned messages and the authenticating handshake.

Every frame is a 26-byte header (magic "SV", version, type, flags, page version, request id,
page, payload length) and a payload. A connection starts with a mutual HMAC-SHA256
challenge-response over the per-VM secret that also binds the VM's shape digest (see
fabric/shape.py); a peer that cannot prove the secret, or that runs a VM of another shape,
gets nothing and is told why before it is dropped.

Handshake (byte counts):
  listener -> client   GREETING (16) + nonce_s (32)        or BUSY (16) + zeros (32), close
  client -> listener   index (4) + nonce_c (32) + shape (32) + mac_c (32)
  listener -> client   index (4) + mac_s (32)              or a refusal (36), close
where mac_c = HMAC(secret, "client" nonce_s nonce_c index shape) and mac_s = HMAC(secret,
"server" nonce_c nonce_s index shape); a refusal is 0xFFFFFFFF, a reason byte, the listener's
index (4) and, for SHAPE, the first 27 bytes of the listener's shape digest.
"""

import contextlib
import enum
import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"SV"
# Frame version (GREETING's "/2" is the handshake's own, unchanged). 2: MIGRATE (a fragment
# of version 1 would take a DOWNGRADE+MIGRATE for a plain DOWNGRADE and keep write-protected
# copies of pages its home then maps writable); a peer of another version is dropped at its
# first frame ("unsupported protocol version"), after the handshake.
VERSION = 2
HEADER = struct.Struct("<2sBBHIIQI")  # magic version kind flags page-version request page length
MAX_PAYLOAD = 1 << 20
GREETING = b"SPANVM-FABRIC/2\n"
BUSY = b"SPANVM-BUSY/2\n\n\n"  # same length as GREETING: too many handshakes in flight
NONCE = 32
SHAPE_SIZE = 32
NO_SHAPE = bytes(SHAPE_SIZE)
HANDSHAKE_TIMEOUT = 5.0
REFUSED_MARK = 0xFFFF_FFFF
REFUSAL = struct.Struct("<IBI27s")  # mark, reason, listener index, detail (36 bytes)


class Kind(enum.IntEnum):
    """Message types."""

    PING = 2
    READ = 3  # requester -> home: a shared copy, please
    WRITE = 4  # requester -> home: exclusive ownership, please
    GRANT = 5  # home -> requester: flags EXCLUSIVE / HAS_DATA
    DOWNGRADE = 6  # home -> owner: write-protect and send the data
    INVALIDATE = 7  # home -> holder: drop the page (flag WANT_DATA: send it first)
    DATA = 8  # reply carrying a page
    ACK = 9  # reply without data
    CONSOLE = 10  # console bytes, to fragment 0
    EXIT = 11  # a vCPU wrote the exit doorbell (page = exit code), to fragment 0
    STOP = 12  # fragment 0 -> all: the VM is over (page = exit code)
    STARTED = 13  # vCPUs started on a fragment (payload: text), to fragment 0
    FAILED = 14  # a fragment failed (page: where it was seen, payload: why): all stop
    INTERRUPT = 15  # to the fragment running vCPU `page`: deliver Interrupt.decode(request)


EXCLUSIVE, HAS_DATA, WANT_DATA, BATCH = 1, 2, 4, 8  # BATCH: read-ahead window / several pages
# MIGRATE, on a READ window (BATCH): the request continues a sequential run, so the window's
# pages only the home holds (the first one included) move to the requester, exclusive and
# writable, rather than being shared; on a batched DOWNGRADE: the home takes the run back and
# the owner drops its copies (docs/fabric.md, "Pages that move").
MIGRATE = 16


class ProtocolError(ConnectionError):
    """A peer sent something that is not a valid frame; the connection is dropped."""


class AuthError(ConnectionError):
    """A peer could not prove it holds the VM's secret, or runs a VM of another shape."""


class BusyError(ConnectionError):
    """The listener has too many handshakes in flight; try again shortly."""


class Refusal(enum.IntEnum):
    """Why a listener refused a handshake (sent to the client before closing)."""

    SECRET = 1  # the client's MAC is wrong: not this VM's secret
    SHAPE = 2  # right secret, but the VM's shape differs (memory, vCPUs, payload, homes)


@dataclass(frozen=True)
class Frame:
    """One message."""

    kind: Kind
    flags: int = 0
    request: int = 0
    page: int = 0
    payload: bytes = b""
    page_version: int = 0  # the page's directory version (GRANT, DATA)
    # More payload after `payload`, sent from where it lies (guest pages: no copy in Python);
    # a receiver sees it all as `payload`. The sender keeps it unchanged until sent.
    chunks: tuple[memoryview, ...] = ()

    def buffers(self) -> list[bytes | memoryview]:
        """The frame on the wire: header and payload, then the chunks."""
        length = len(self.payload) + sum(c.nbytes for c in self.chunks)
        header = HEADER.pack(
            MAGIC,
            VERSION,
            self.kind,
            self.flags,
            self.page_version,
            self.request,
            self.page,
            length,
        )
        return [header + self.payload, *self.chunks]

    def with_request(self, request: int) -> "Frame":
        """This frame with another request id (a cheaper `dataclasses.replace`: the fault
        path numbers every request it sends)."""
        return Frame(
            self.kind, self.flags, request, self.page, self.payload, self.page_version, self.chunks
        )

    def encode(self) -> bytes:
        return b"".join(self.buffers())


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes, or ConnectionError when the peer closes first."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed by peer")
        chunks += chunk
    return bytes(chunks)


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) < size:
        raise ConnectionError("connection closed by peer")
    return data


def read_frame(stream: BinaryIO) -> Frame:
    """The next frame from a buffered stream over the connection (`sock.makefile("rb")`, so
    a header and its payload usually cost one recv); ProtocolError on a bad magic, version,
    type or length."""
    magic, version, kind, flags, page_version, request, page, length = HEADER.unpack(
        _read_exact(stream, HEADER.size)
    )
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {length} bytes is over the limit")
    try:
        kind_ = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message type {kind}") from None
    payload = _read_exact(stream, length) if length else b""
    return Frame(kind_, flags, request, page, payload, page_version)


def _mac(secret: bytes, role: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, role + b"".join(parts), hashlib.sha256).digest()


def refuse_busy(sock: socket.socket) -> None:
    """Tell a just-accepted client that the listener is busy (never blocks); caller closes."""
    try:
        sock.setblocking(False)
        sock.send(BUSY + bytes(NONCE))
    except OSError:
        pass


def _refuse(sock: socket.socket, reason: Refusal, my_index: int, detail: bytes = b"") -> None:
    with contextlib.suppress(OSError):
        sock.sendall(REFUSAL.pack(REFUSED_MARK, reason, my_index, detail[: REFUSAL.size - 9]))


def handshake_server(
    sock: socket.socket, secret: bytes, my_index: int, shape: bytes = NO_SHAPE
) -> int:
    """Authenticate an accepted connection; returns the peer's fragment index. AuthError (the
    client is told why) if it lacks the secret or its VM's `shape` digest differs from ours."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    nonce_s = os.urandom(NONCE)
    sock.sendall(GREETING + nonce_s)
    reply = recv_exact(sock, 4 + NONCE + SHAPE_SIZE + 32)
    (peer,) = struct.unpack("<I", reply[:4])
    nonce_c = reply[4 : 4 + NONCE]
    peer_shape = reply[4 + NONCE : 4 + NONCE + SHAPE_SIZE]
    mac = reply[4 + NONCE + SHAPE_SIZE :]
    if not hmac.compare_digest(
        mac, _mac(secret, b"client", nonce_s, nonce_c, reply[:4], peer_shape)
    ):
        _refuse(sock, Refusal.SECRET, my_index)
        raise AuthError(f"peer claiming to be fragment {peer} failed authentication")
    if not hmac.compare_digest(peer_shape, shape):
        _refuse(sock, Refusal.SHAPE, my_index, shape)
        raise AuthError(
            f"fragment {peer} runs a VM of another shape than fragment {my_index}"
            f" (shape {peer_shape.hex()[:12]} vs {shape.hex()[:12]}: memory, vCPUs, payload,"
            " argument or homes differ)"
        )
    index = struct.pack("<I", my_index)
    sock.sendall(index + _mac(secret, b"server", nonce_c, nonce_s, index, shape))
    sock.settimeout(None)
    return int(peer)


def handshake_client(
    sock: socket.socket, secret: bytes, my_index: int, shape: bytes = NO_SHAPE
) -> int:
    """Authenticate to a listener; returns the listener's fragment index. BusyError if the
    listener has too many handshakes in flight (retry); AuthError saying why it refused us,
    or if it cannot prove the secret itself."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    greeting = recv_exact(sock, len(GREETING) + NONCE)
    if greeting.startswith(BUSY):
        raise BusyError("the listener is busy with other handshakes")
    if not greeting.startswith(GREETING):
        raise ProtocolError("not a spanvm fabric listener (or another fabric version)")
    nonce_s, nonce_c = greeting[len(GREETING) :], os.urandom(NONCE)
    index = struct.pack("<I", my_index)
    mac = _mac(secret, b"client", nonce_s, nonce_c, index, shape)
    sock.sendall(index + nonce_c + shape + mac)
    reply = recv_exact(sock, 4 + 32)
    mark, reason, listener, detail = REFUSAL.unpack(reply)
    if mark == REFUSED_MARK:
        raise AuthError(_refusal_text(reason, listener, my_index, shape, detail))
    if not hmac.compare_digest(
        reply[4:], _mac(secret, b"server", nonce_c, nonce_s, reply[:4], shape)
    ):
        raise AuthError("listener failed authentication (it does not hold this VM's secret)")
    sock.settimeout(None)
    return int(struct.unpack("<I", reply[:4])[0])


def _refusal_text(reason: int, listener: int, me: int, shape: bytes, detail: bytes) -> str:
    if reason == Refusal.SECRET:
        return f"authentication refused by fragment {listener} (wrong VM secret?)"
    if reason == Refusal.SHAPE:
        return (
            f"fragment {listener} refused fragment {me}: they run VMs of different shapes"
            f" (fragment {listener}: {detail.hex()[:12]}, fragment {me}: {shape.hex()[:12]};"
            " memory, vCPUs, payload, argument or homes differ: started for another VM?)"
        )
    return f"fragment {listener} refused the connection (reason {reason})"
