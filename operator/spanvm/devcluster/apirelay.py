"""Lets processes inside a simulated node's network namespace reach the API server on the
root namespace's loopback, as a pod reaches its API server through the cluster network.

A listening socket is created inside the namespace (a thread enters it with setns(2), binds
127.0.0.1:<apiserver port> there and comes back); every connection it accepts is spliced to
the real API server. TLS passes through untouched, so the same kubeconfig works on both
sides. No address is routed from the root namespace: nothing leaves the machine.
"""

import ctypes
import os
import socket
import threading
from contextlib import suppress

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def listen_in_namespace(namespace: str, port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:port inside the named network namespace."""
    result: list[socket.socket | BaseException] = []

    def enter_bind_return() -> None:  # in a thread of its own: setns changes only this thread
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen(64)
                result.append(sock)
            finally:
                _setns(home)
        except BaseException as err:
            result.append(err)
        finally:
            os.close(home)
            os.close(target)

    thread = threading.Thread(target=enter_bind_return)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _splice(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both sides finish, then close both."""
    back = threading.Thread(target=_pump, args=(b, a), daemon=True)
    back.start()
    _pump(a, b)
    back.join()
    a.close()
    b.close()


class ApiRelay:
    """Relays 127.0.0.1:port in each given namespace to 127.0.0.1:port here."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._listeners: list[socket.socket] = []
        self._closed = threading.Event()

    def add(self, namespace: str) -> None:
        listener = listen_in_namespace(namespace, self.port)
        self._listeners.append(listener)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                inside, _ = listener.accept()
            except OSError:
                return
            try:
                outside = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                outside.settimeout(None)
            except OSError:
                inside.close()
                continue
            threading.Thread(target=_splice, args=(inside, outside), daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        for listener in self._listeners:
            with suppress(OSError):
                listener.close()
        self._listeners.clear()
