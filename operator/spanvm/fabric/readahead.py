"""Adaptive read-ahead: how many pages a fault on a missing page asks for, and which windows
to ask for before the guest reaches them.

One `ReadAhead` follows one fragment's stream of faults on missing pages (the fault thread's
own state, no locking). A fault that continues the run of pages already asked for doubles the
window, and once the run has continued twice in a row (a scan) the window is the limit at
once (doubling from 8 left a 64 MiB scan's first windows small: 62-75k -> 82-93k pages/s);
a fault anywhere else divides it by four, down to one page, so random access asks for little
more than it touches (every page granted is a page some writer may have to invalidate later).
While a run continues, further windows are asked for ahead of the guest (pipelined
requests): one at first, twice as many with each fault that finds the run going on (a
fault on a page asked for, or on a window still coming), up to `depth`. A sequential scan
then waits for the link's bandwidth, not for one round trip per window, while a short run
takes little of its home's data (a scan's pages may move to the reader).
"""

from collections.abc import Callable
from typing import Any

START_WINDOW = 8
PREFETCH_DEPTH = 15
RUN_AFTER = 2  # faults in a row that continue a run before it counts as sequential
Wait = Callable[[], Any]


class ReadAhead:
    """The window and the pages already asked for ahead of one fragment's faults."""

    def __init__(self, limit: int, depth: int = PREFETCH_DEPTH) -> None:
        self.limit = max(1, limit)
        self.depth = depth if self.limit > 1 else 0  # a limit of 1: no read-ahead at all
        self.window = min(self.limit, START_WINDOW)
        self.last = -1  # the page of the last fault
        self.streak = 0  # faults in a row that continued the run
        self.ahead = -1  # every page of the current run before this one was asked for
        self._in_flight: list[tuple[int, int, Wait]] = []  # windows asked for ahead: [first, end)

    def on_fault(self, page: int, room: int) -> tuple[int, bool]:
        """A fault on missing `page`, `room` pages before the end of its home range: the
        window it asks for, and whether the run is sequential (only then ask ahead, or take
        a run of pages from the fragment that owns them)."""
        continues = self.last < page <= self.ahead
        if continues:
            self.streak += 1
            # A run that went on twice is a scan: ask for whole windows at once from then on.
            grown = self.limit if self.streak >= RUN_AFTER else self.window * 2
            self.window = min(self.limit, grown)
        else:
            self.window = max(1, self.window // 4)
            self.streak = 0
        count = max(1, min(self.window, room))
        self.last = page
        self._in_flight = [w for w in self._in_flight if continues and w[1] > page]
        self.ahead = max(page + count, self.ahead) if continues else page + count
        # Two pages taking turns (a flag and its data) continue each other every other fault:
        # only a run that went on twice in a row is worth asking ahead or taking from a writer.
        return count, self.streak >= RUN_AFTER

    def caught_up(self) -> None:
        """The guest faulted on a window asked for ahead that had not arrived: the run goes
        on, so ask further ahead from now on."""
        self.streak += 1

    def windows_ahead(self) -> int:
        """How many windows past the faulting one to ask for now: 1, 2, 4... with each fault
        the run went on past RUN_AFTER, at most `depth`; none before."""
        if self.streak < RUN_AFTER:
            return 0
        return min(self.depth, 1 << min(self.streak - RUN_AFTER, 16))

    def prefetch(self, page: int, end: int) -> list[tuple[int, int]]:
        """After a sequential fault on `page`: (first, count) of the windows to ask for now,
        so that pages up to `windows_ahead()` windows past this one's are asked for, within
        [page, end) (the end of the page's home range)."""
        out: list[tuple[int, int]] = []
        target = min(end, page + self.window * (1 + self.windows_ahead()))
        while self.ahead < target:
            count = min(self.window, target - self.ahead)
            out.append((self.ahead, count))
            self.ahead += count
        return out

    def sent(self, first: int, count: int, wait: Wait) -> None:
        """A window asked for ahead of the guest; `wait` returns once its grant is applied."""
        self._in_flight.append((first, first + count, wait))

    def in_flight(self, page: int) -> Wait | None:
        """The wait for a window asked for ahead that holds `page`, if any."""
        for first, end, wait in self._in_flight:
            if first <= page < end:
                return wait
        return None
