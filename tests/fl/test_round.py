"""fl.aggregator.Round: the pure round logic (acceptance, quorum, deadline, alignment)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fl.aggregator import Refused, Round, RoundFreshness, strategy_named
from fl.update import ModelUpdate
from pqc.errors import Replay
from pqc.freshness import FileFreshness


def update(who: str, round_: int, w: list[float], examples: int = 10,
           name: str = "f/x") -> ModelUpdate:
    return ModelUpdate(who, round_, examples, {name: w, "intercept": [0.0]})


def test_round_refuses_late_stale_future_duplicate_and_layout() -> None:
    r = Round(3, "v2", {"f/x": np.array([0.0, 0.0]), "intercept": np.array([0.0])}, 3, 10.0)
    cases = [(update("a", 2, [1, 1]), "late"), (update("a", 1, [1, 1]), "stale_round"),
             (update("a", 4, [1, 1]), "future_round"), (update("a", 3, [1, 1, 1]), "layout")]
    for u, reason in cases:
        with pytest.raises(Refused) as refused:
            r.offer(u, 0.0)
        assert refused.value.reason == reason
    r.offer(update("a", 3, [1, 1]), 0.0)
    with pytest.raises(Refused, match="duplicate"):
        r.offer(update("a", 3, [2, 2]), 0.0)


def test_round_closes_at_quorum_or_deadline_with_lineage() -> None:
    r = Round(1, None, {}, 3, 5.0)
    assert not r.ready(100.0)  # nothing accepted: a deadline alone never publishes
    r.offer(update("b", 1, [3.0], 30), 10.0)
    r.offer(update("a", 1, [1.0], 10), 11.0)
    assert not r.ready(14.9)
    assert r.ready(15.0)
    g = r.close(strategy_named("fedavg"))
    assert g.round == 1 and g.parent_version is None and g.contributors == ("a", "b")
    assert g.examples == 40 and g.parameters["f/x"] == pytest.approx([2.5])
    nxt = r.next(g)
    assert (nxt.number, nxt.parent_version, nxt.updates) == (2, g.version, {})


def test_a_feature_one_retailer_never_saw_is_averaged_over_those_that_did() -> None:
    r = Round(1, None, {}, 2, 5.0)
    r.offer(update("a", 1, [4.0], name="f/only_a"), 0.0)
    r.offer(update("b", 1, [2.0], name="f/only_b"), 0.0)
    g = r.close(strategy_named("fedmedian"))
    assert g.parameters["f/only_a"] == pytest.approx([4.0])
    assert g.parameters["f/only_b"] == pytest.approx([2.0])


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="fedavg"):
        strategy_named("fedsgd")


def test_round_freshness_reaches_the_durable_store_only_when_published(tmp_path: Path) -> None:
    path = tmp_path / "freshness.json"
    fresh = RoundFreshness(FileFreshness(path))
    fresh.advance("retailer-0", "fl.update", 5)
    with pytest.raises(Replay):
        fresh.advance("retailer-0", "fl.update", 5)
    assert FileFreshness(path).last_sequence("retailer-0", "fl.update") is None
    fresh.discard()  # a restart before publishing: the same update is accepted again
    fresh.advance("retailer-0", "fl.update", 5)
    fresh.persist()
    assert FileFreshness(path).last_sequence("retailer-0", "fl.update") == 5
    with pytest.raises(Replay):
        RoundFreshness(FileFreshness(path)).advance("retailer-0", "fl.update", 4)
