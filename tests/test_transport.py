"""The fabric transport's listener on real loopback sockets: idle strangers cost a bounded
number of threads, a real peer still gets in, and a refused handshake says why (wrong secret,
another VM's shape) on both sides."""

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest

from spanvm.fabric.transport import MAX_HANDSHAKES, FabricError, Handlers, Transport
from spanvm.fabric.wire import AuthError, Frame, handshake_client

SECRET = bytes(range(32))
SHAPE = b"\x11" * 32
IDLE_CLIENTS = 200


def _ignore_frame(_peer: int, _frame: Frame) -> None:
    pass


def _no_directives(frame: Frame) -> Frame:
    raise AssertionError(f"no directive expected, got {frame}")


def _handlers(failures: list[str]) -> Handlers:
    return Handlers(
        on_request=_ignore_frame,
        try_inline=lambda _peer, _frame: True,
        on_directive=_no_directives,
        on_grant=lambda _frame: None,
        on_event=_ignore_frame,
        on_failure=failures.append,
    )


@contextmanager
def transport(
    index: int, secret: bytes = SECRET, shape: bytes = SHAPE, count: int = 2
) -> Iterator[Transport]:
    t = Transport(index, count, secret, _handlers([]), shape=shape)
    try:
        yield t
    finally:
        t.close()


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_idle_connections_cost_bounded_threads_and_a_peer_still_connects() -> None:
    with transport(0) as listener, ExitStack() as idle:
        host, port = listener.listen("127.0.0.1").rsplit(":", 1)
        before = threading.active_count()  # the accept thread included
        for _ in range(IDLE_CLIENTS):
            idle.enter_context(socket.create_connection((host, int(port)), timeout=5))
        _wait(lambda: listener.busy_refused >= IDLE_CLIENTS - MAX_HANDSHAKES)
        peak = threading.active_count()
        assert peak - before <= MAX_HANDSHAKES, f"{peak - before} threads for idle clients"
        assert listener.busy_refused == IDLE_CLIENTS - MAX_HANDSHAKES
        with transport(1) as peer:  # retries on BUSY until the idle handshakes time out
            started = time.monotonic()
            peer.connect({0: f"{host}:{port}"})
            _wait(lambda: 1 in listener.peers)
            assert 0 in peer.peers
            assert time.monotonic() - started < 10


def test_a_busy_listener_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "spanvm.fabric")
    with transport(0) as listener, ExitStack() as idle:
        host, port = listener.listen("127.0.0.1").rsplit(":", 1)
        for _ in range(MAX_HANDSHAKES + 20):
            idle.enter_context(socket.create_connection((host, int(port)), timeout=5))
        _wait(lambda: listener.busy_refused >= 20)
    busy = [r for r in caplog.records if "handshakes in flight" in r.getMessage()]
    assert len(busy) == 1, [r.getMessage() for r in caplog.records]


def test_the_wrong_secret_is_refused_saying_so() -> None:
    with transport(0) as listener:
        host, port = listener.listen("127.0.0.1").rsplit(":", 1)
        with (
            socket.create_connection((host, int(port)), timeout=10) as sock,
            pytest.raises(AuthError, match=r"authentication refused by fragment 0 \(wrong VM"),
        ):
            handshake_client(sock, os.urandom(32), 1, SHAPE)
        with transport(1, secret=os.urandom(32)) as stranger, pytest.raises(FabricError) as err:
            stranger.connect({0: f"{host}:{port}"})
        assert "authentication refused by fragment 0 (wrong VM secret?)" in str(err.value)
        _wait(lambda: listener.refused == 2)
        assert not listener.peers


def test_a_peer_of_another_vm_shape_is_refused_naming_both(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "spanvm.fabric")
    with transport(0) as listener:
        endpoint = listener.listen("127.0.0.1")
        with transport(1, shape=b"\x22" * 32) as other, pytest.raises(FabricError) as err:
            other.connect({0: endpoint})
        assert (
            "fragment 0 refused fragment 1: they run VMs of different shapes"
            f" (fragment 0: {'11' * 6}, fragment 1: {'22' * 6};"
        ) in str(err.value)
        _wait(lambda: listener.refused == 1)
        assert not listener.peers
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"fragment 1 runs a VM of another shape than fragment 0 (shape {'22' * 6}" in logged
