"""The one split of guest memory among fragments (scheduler, home plan, `spanvm run`)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from spanvm.fabric.homes import coherent_ranges, plan_homes
from spanvm.shares import UNIT, memory_shares, share_ranges

MiB, GiB = 1 << 20, 1 << 30


def test_proportional_to_vcpus_remainder_to_the_first_with_room() -> None:
    assert memory_shares(10 * UNIT, [1, 1, 1]) == [4 * UNIT, 3 * UNIT, 3 * UNIT]
    assert memory_shares(10 * UNIT, [1, 1, 1], [3 * UNIT, 9 * UNIT, 9 * UNIT]) == [
        3 * UNIT,
        4 * UNIT,
        3 * UNIT,
    ]
    assert memory_shares(10 * UNIT, [1, 1], [4 * UNIT, 5 * UNIT]) is None


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 8 * 1024).map(lambda units: units * UNIT),
    st.lists(st.integers(1, 16), min_size=1, max_size=8),
)
def test_shares_add_up_and_homes_are_the_shares_less_the_system_area(
    memory: int, vcpus: list[int]
) -> None:
    shares = memory_shares(memory, vcpus)
    assert shares is not None and sum(shares) == memory
    assert all(s % UNIT == 0 for s in shares)
    spans = share_ranges(memory, shares)
    for index, share in enumerate(shares):
        assert sum(e - s for s, e, i in spans if i == index) == share
    homes = plan_homes(memory, shares)
    coherent = sum(e - s for s, e in coherent_ranges(memory))
    assert sum(h.end - h.start for h in homes) == coherent
    system = memory - coherent  # below IMAGE_BASE: each fragment's own
    for index, share in enumerate(shares):
        home = sum(h.end - h.start for h in homes if h.index == index)
        outside = max(0, min(share, system) - sum(shares[:index])) if index == 0 else 0
        assert home == share - outside


def test_shares_follow_the_memory_map_across_the_3_gib_hole() -> None:
    spans = share_ranges(4 * GiB, [2 * GiB, 2 * GiB])
    assert spans == [
        (0, 2 * GiB, 0),
        (2 * GiB, 3 * GiB, 1),
        (4 * GiB, 5 * GiB, 1),
    ]
