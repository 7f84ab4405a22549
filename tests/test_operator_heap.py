"""The operator keeps the garbage collector off what its caches hold (controller/main.py)."""

import gc

from spanvm.controller.main import GC_THRESHOLD, settle_heap


def test_the_heap_is_frozen_and_collected_less_often() -> None:
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == GC_THRESHOLD > before[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
