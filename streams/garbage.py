"""The garbage collector's policy for a long-running process that holds much acyclic state
(a worker's tables, the demo's tallies): light to import, so any process can apply it."""

from __future__ import annotations

import gc


def collect_youngest_generation_only() -> tuple[int, int, int]:
    """Have the garbage collector collect only its youngest generation automatically, as a
    process that runs the pipeline should; returns the thresholds before.

    A full collection walks the tables' entity state (many small dicts and lists, freed by
    reference counting, not cycles) and finds ~nothing: measured on a backlog, 6-7 of them
    in 5 s, 390-420 ms in all (freezing the state every 5 s was too slow to keep up at
    thousands of tx/s). The middle generation's collections walked each new entity a
    second time, cold: 60-75 % of the pipeline's collection time (10.4 us a transaction,
    2.4-4.5 without them). Cycles that outlive one young collection wait for the caller's
    own full collections: in a worker, ~100 objects in 50 s at 1,000 tx/s (30-57 when the
    middle generation was collected too).
    """
    before = gc.get_threshold()
    gc.set_threshold(before[0], 2**31 - 1, 2**31 - 1)
    return before
