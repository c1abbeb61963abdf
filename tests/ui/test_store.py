"""The shared store: size caps, ordering, one verdict per transaction."""

from __future__ import annotations

import doctest
import threading

import pytest

import ui.admin
import ui.charts
import ui.format
import ui.kafka_reader
import ui.store
import ui.worker_metrics
from fraud.schema import Decision, Label
from ui.store import CappedDict, Store, TopicRecord


def _d(i: int, action: str = "hold", retailer: str = "acme", score: float = 0.9) -> Decision:
    return Decision(f"t{i}", retailer, score, action, timings={"decided": 1000.0 + i})


@pytest.mark.parametrize("module", [ui.store, ui.format, ui.charts, ui.worker_metrics,
                                    ui.kafka_reader, ui.admin])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


def test_every_collection_is_capped():
    s = Store(max_decisions=100, max_transactions=50, max_labels=30, max_records=10)
    for i in range(10_000):
        s.add_decision(_d(i), "c")
        s.add_transaction(f"t{i}", {"amount": 1.0})
        s.add_label(Label(f"t{i}", False, "analyst", 1.0))
        s.add_record(TopicRecord("qsfraud.config", i, None, b"x", 1.0))
    assert s.sizes() == {"decisions": 100, "transactions": 50, "labels": 30, "verdicts": 30,
                         "qsfraud.config": 10}
    assert [r.decision.tx_id for r in s.feed(limit=2)] == ["t9999", "t9998"]


def test_capped_dict_forgets_the_oldest_first():
    d: CappedDict[int, int] = CappedDict(3)
    for i in range(5):
        d[i] = i
    d[2] = 20  # an update keeps its place
    assert d.items() == [(2, 20), (3, 3), (4, 4)]
    with pytest.raises(ValueError):
        CappedDict(0)


def test_feed_is_newest_first_and_filtered():
    s = Store()
    s.add_decision(_d(2, "allow", "acme", 0.1), "c")
    s.add_decision(_d(1, "block", "zeta", 0.99), "c")
    s.add_decision(_d(3, "hold", "acme", 0.85), "c")
    assert [r.decision.tx_id for r in s.feed()] == ["t3", "t2", "t1"]
    assert [r.decision.tx_id for r in s.feed(retailers=["acme"])] == ["t3", "t2"]
    assert [r.decision.tx_id for r in s.feed(actions=["block", "hold"])] == ["t3", "t1"]
    assert [r.decision.tx_id for r in s.feed(min_score=0.5, max_score=0.9)] == ["t3"]


def test_a_redelivered_decision_is_kept_once():
    s = Store()
    s.add_decision(_d(1), "c", seen_at=1.0)
    s.add_decision(_d(1), "c", seen_at=2.0)
    assert [r.seen_at for r in s.feed()] == [1.0]


def test_review_queue_is_oldest_first_and_drops_verdicts_and_labels():
    s = Store()
    for i, action in enumerate(["hold", "allow", "verify", "block", "hold", "hold"]):
        s.add_decision(_d(i, action), "c")
    assert [r.decision.tx_id for r in s.review_queue()] == ["t0", "t2", "t4", "t5"]
    assert s.claim_verdict("t0", True)
    s.add_label(Label("t4", True, "chargeback", 5.0))
    s.add_label(Label("t5", False, "analyst", 5.0))
    assert [r.decision.tx_id for r in s.review_queue()] == ["t2"]


def test_one_verdict_per_transaction_even_under_contention():
    s = Store()
    wins: list[bool] = []
    threads = [threading.Thread(target=lambda: wins.append(s.claim_verdict("t1", True)))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    s.settle_verdict("t1", None)
    verdict = s.verdict("t1")
    assert verdict is not None and verdict.state == "sent"
    assert not s.claim_verdict("t1", False)


def test_a_failed_verdict_can_be_given_again_but_not_over_a_read_back_label():
    s = Store()
    assert s.claim_verdict("t1", True)
    s.settle_verdict("t1", "broker down")
    assert s.claim_verdict("t1", True)
    s.add_label(Label("t2", True, "analyst", 1.0))  # read back from <R>.labels after a restart
    assert not s.claim_verdict("t2", False)
    s.add_label(Label("t3", True, "chargeback", 1.0))
    assert not s.claim_verdict("t3", False)


def test_federated_rounds_are_read_from_signed_global_models(tmp_path):
    import numpy as np

    from fl.client import GlobalModel, sign_global
    from pqc.keys import init_keystore

    aggregator = init_keystore(tmp_path / "agg", "aggregator", "aggregator")
    records = [TopicRecord("qsfraud.fl.global", r - 1, None, sign_global(
        GlobalModel(r, f"g{r}", f"g{r - 1}" if r > 1 else None,
                    tuple(f"retailer-{i}" for i in range(r + 1)), "FedAvg", 10 * r,
                    {"intercept": np.array([0.1 * r])}), aggregator.identity, r),
        1000.0 + r) for r in (1, 2)]
    records.insert(1, TopicRecord("qsfraud.fl.global", 9, None, b"not a global model", 1001.5))
    frame = ui.charts.federated_rounds(records)
    assert list(frame["round"]) == [1, 2]
    assert list(frame["contributors"]) == [2, 3]
    assert list(frame["version"]) == ["g1", "g2"]
    assert list(frame["strategy"]) == ["FedAvg", "FedAvg"]
    assert ui.charts.federated_rounds([]).empty
