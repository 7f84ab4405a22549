"""Adaptive read-ahead (fabric/readahead.py): how the window follows the access pattern and
which windows are asked for ahead of the guest."""

from spanvm.fabric.readahead import ReadAhead


def test_a_sequential_run_grows_the_window_to_its_limit() -> None:
    stream = ReadAhead(64)
    page, windows = 1000, []
    for _ in range(6):
        window, sequential = stream.on_fault(page, room=10_000)
        windows.append((window, sequential))
        page += window  # the guest faults on the first page not asked for
    # sequential once the run went on twice in a row: a scan, asked for in whole windows
    assert windows == [(2, False), (4, False), (64, True), (64, True), (64, True), (64, True)]


def test_random_faults_shrink_the_window_to_one_page() -> None:
    stream = ReadAhead(64)
    for page in (100, 101, 103):  # a run: the window grows
        stream.on_fault(page, room=10_000)
    assert stream.window == 64
    windows = [stream.on_fault(page, room=10_000) for page in (5000, 20, 9000, 7)]
    assert windows == [(16, False), (4, False), (1, False), (1, False)]


def test_windows_stay_within_the_home_range() -> None:
    stream = ReadAhead(64)
    assert stream.on_fault(100, room=1) == (1, False)


def test_windows_ahead_follow_the_run_up_to_the_range_end() -> None:
    stream = ReadAhead(8, depth=2)
    stream.on_fault(0, room=100)  # window 2: pages 0-1 asked for
    window, sequential = stream.on_fault(2, room=98)  # window 4: pages 2-5
    assert (window, sequential) == (4, False)  # continued once: not asked ahead yet
    assert stream.prefetch(2, end=100) == []
    assert stream.on_fault(6, room=94) == (8, True)  # a scan: whole windows, pages 6-13
    assert stream.prefetch(6, end=100) == [(14, 8)]  # one window ahead at first
    assert stream.prefetch(6, end=100) == []  # already asked for
    waits = []
    stream.sent(14, 8, lambda: waits.append(14))
    wait = stream.in_flight(15)
    assert wait is not None and stream.in_flight(22) is None
    wait()
    assert waits == [14]
    stream.caught_up()  # the guest waited for that window: the run goes on
    assert stream.prefetch(15, end=100) == [(22, 8), (30, 8), (38, 1)]  # 2 windows past 15's
    stream.caught_up()
    stream.caught_up()  # at most `depth` windows ahead
    assert stream.windows_ahead() == 2
    assert stream.prefetch(30, end=50) == [(39, 8), (47, 3)]  # clipped at the range end


def test_a_short_run_asks_little_ahead_a_long_one_up_to_the_depth() -> None:
    """A scan's pages may move to the reader: the windows asked ahead double with each
    fault that finds the run going on (1, 2, 4, ...) rather than starting at the depth."""
    stream = ReadAhead(64)
    page, ahead = 0, []
    for _ in range(8):
        window, _ = stream.on_fault(page, room=100_000)
        ahead.append(stream.windows_ahead())
        page += window
    assert ahead == [0, 0, 1, 2, 4, 8, 15, 15]


def test_a_limit_of_one_page_never_reads_ahead() -> None:
    stream = ReadAhead(1)
    for page in range(10):
        assert stream.on_fault(page, room=100) == (1, page > 1)
        assert stream.prefetch(page, end=100) == []


def test_two_pages_taking_turns_are_never_a_run() -> None:
    """A flag and its data on neighbouring pages (message passing): each other fault
    continues the other, but never twice in a row, so nothing is asked ahead or taken."""
    stream = ReadAhead(64)
    assert not any(stream.on_fault(page, room=100)[1] for page in [10, 11] * 20)
