"""userfaultfd events as the fault thread reads them (spanvm.fabric.uffd.read_faults)."""

import ctypes
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spanvm.fabric.uffd import PAGE_SIZE, READ_BATCH, Userfault
from spanvm.vmm.memory import GuestMemory

PAGES = READ_BATCH + 5  # more faults pending than one read(2) takes


@pytest.fixture
def region() -> Iterator[tuple[GuestMemory, Userfault]]:
    memory = GuestMemory(PAGES * PAGE_SIZE)
    uffd = Userfault(memory.host_address, memory.size)
    try:
        yield memory, uffd
    finally:
        uffd.close()
        memory.close()


def _waiting_in_userfault(tid: int) -> bool:
    return Path(f"/proc/self/task/{tid}/wchan").read_text() == "handle_userfault"


def test_every_pending_fault_is_read_with_its_page_kind_and_thread(
    region: tuple[GuestMemory, Userfault],
) -> None:
    """PAGES threads fault at once (reads on even pages, writes on odd): one read_faults
    returns every one, each with its page, whether it writes, and the faulting thread's id,
    although one read(2) takes at most READ_BATCH of them."""
    memory, uffd = region
    tids: dict[int, int] = {}  # page -> thread id
    word = ctypes.create_string_buffer(8)

    def touch(page: int) -> None:
        tids[page] = threading.get_native_id()
        address = memory.host_address + page * PAGE_SIZE
        if page % 2:  # memmove releases the GIL while it waits for the page
            ctypes.memmove(address, word, 8)
        else:
            ctypes.memmove(word, address, 8)

    threads = [threading.Thread(target=touch, args=(p,), daemon=True) for p in range(PAGES)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(tids) < PAGES or not all(map(_waiting_in_userfault, tids.values())):
        assert time.monotonic() < deadline, "the threads did not all fault within 10 s"
        time.sleep(0.01)
    faults = uffd.read_faults(1.0)
    try:
        got = {(f.address - memory.host_address) // PAGE_SIZE: f for f in faults}
        assert len(faults) == PAGES and sorted(got) == list(range(PAGES))
        for page, fault in got.items():
            assert fault.write == bool(page % 2) and not fault.wp
            assert fault.thread == tids[page]
        assert uffd.read_faults(0.0) == []  # nothing left pending
    finally:
        for page in range(PAGES):
            uffd.install(memory.host_address + page * PAGE_SIZE, None, writable=True)
        for thread in threads:
            thread.join(5)
