"""The fabric's wire format: framed, versioned messages and the authenticating handshake.

Every frame is a 26-byte header (magic "SV", version, type, flags, page version, request id,
page, payload length) and a payload. A connection starts with a mutual HMAC-SHA256
challenge-response over the per-VM secret; a peer that cannot prove the secret gets nothing
and is dropped.
"""

import enum
import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"SV"
VERSION = 1
HEADER = struct.Struct("<2sBBHIIQI")  # magic version kind flags page-version request page length
MAX_PAYLOAD = 1 << 20
GREETING = b"SPANVM-FABRIC/1\n"
NONCE = 32
HANDSHAKE_TIMEOUT = 5.0


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


EXCLUSIVE, HAS_DATA, WANT_DATA, BATCH = 1, 2, 4, 8  # BATCH: read-ahead window / several pages


class ProtocolError(ConnectionError):
    """A peer sent something that is not a valid frame; the connection is dropped."""


class AuthError(ConnectionError):
    """A peer could not prove it holds the VM's secret."""


@dataclass(frozen=True)
class Frame:
    """One message."""

    kind: Kind
    flags: int = 0
    request: int = 0
    page: int = 0
    payload: bytes = b""
    page_version: int = 0  # the page's directory version (GRANT, DATA)

    def encode(self) -> bytes:
        return (
            HEADER.pack(
                MAGIC,
                VERSION,
                self.kind,
                self.flags,
                self.page_version,
                self.request,
                self.page,
                len(self.payload),
            )
            + self.payload
        )


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


def handshake_server(sock: socket.socket, secret: bytes, my_index: int) -> int:
    """Authenticate an accepted connection; returns the peer's fragment index."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    nonce_s = os.urandom(NONCE)
    sock.sendall(GREETING + nonce_s)
    reply = recv_exact(sock, 4 + NONCE + 32)
    (peer,) = struct.unpack("<I", reply[:4])
    nonce_c, mac = reply[4 : 4 + NONCE], reply[4 + NONCE :]
    if not hmac.compare_digest(mac, _mac(secret, b"client", nonce_s, nonce_c, reply[:4])):
        raise AuthError(f"peer claiming to be fragment {peer} failed authentication")
    index = struct.pack("<I", my_index)
    sock.sendall(index + _mac(secret, b"server", nonce_c, nonce_s, index))
    sock.settimeout(None)
    return int(peer)


def handshake_client(sock: socket.socket, secret: bytes, my_index: int) -> int:
    """Authenticate to a listener; returns the listener's fragment index."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    greeting = recv_exact(sock, len(GREETING) + NONCE)
    if not greeting.startswith(GREETING):
        raise ProtocolError("not a spanvm fabric listener")
    nonce_s, nonce_c = greeting[len(GREETING) :], os.urandom(NONCE)
    index = struct.pack("<I", my_index)
    sock.sendall(index + nonce_c + _mac(secret, b"client", nonce_s, nonce_c, index))
    reply = recv_exact(sock, 4 + 32)
    if not hmac.compare_digest(reply[4:], _mac(secret, b"server", nonce_c, nonce_s, reply[:4])):
        raise AuthError("listener failed authentication")
    sock.settimeout(None)
    return int(struct.unpack("<I", reply[:4])[0])
