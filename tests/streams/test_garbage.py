"""The collector's policy for processes holding much acyclic state (workers, the demo)."""

from __future__ import annotations

import gc

from streams.garbage import collect_youngest_generation_only


def test_only_the_youngest_generation_is_collected_automatically() -> None:
    before = gc.get_threshold()
    try:
        assert collect_youngest_generation_only() == before
        young, middle, old = gc.get_threshold()
        assert young == before[0]
        assert middle >= 2**31 - 1 and old >= 2**31 - 1
    finally:
        gc.set_threshold(*before)
