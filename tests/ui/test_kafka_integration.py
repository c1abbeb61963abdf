"""The UI's reader and publisher on real Kafka: decisions reach the store, a verdict lands on
``<R>.labels`` exactly once (also across a restart), and Kafka going away and back."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from qsfraud.stack import Stack, StackConfig
from tests.ui.conftest import decision, produce_decisions
from tests.ui.test_pages import labels_on
from ui.runtime import Runtime, UiSettings


def wait(check: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_decisions_reach_the_store_and_a_verdict_lands_once(kafka_bootstrap, unique_name):
    produce_decisions(kafka_bootstrap, unique_name, [])
    rt = Runtime(UiSettings(kafka_bootstrap, retailers=(unique_name,)))
    try:
        wait(lambda: rt.store.status.labels_loaded)
        now = time.time()
        produce_decisions(kafka_bootstrap, unique_name, [
            (decision(f"tx-{i}", unique_name, 0.9, "hold", now + i), f"cust-{i}", 50.0)
            for i in range(20)])
        wait(lambda: len(rt.store.feed()) == 20)
        assert rt.store.feed()[0].key == "cust-19"
        assert rt.store.amounts(["tx-3"]) == {"tx-3": (50.0, "EUR")}
        assert rt.publisher is not None
        assert rt.publisher.publish(unique_name, "tx-3", "cust-3", True) == "sent"
        assert rt.publisher.publish(unique_name, "tx-3", "cust-3", False) == "already"
        wait(lambda: any(lb.tx_id == "tx-3" for lb in rt.store.labels()))
        assert "tx-3" not in [r.decision.tx_id for r in rt.store.review_queue()]
    finally:
        rt.stop()

    restarted = Runtime(UiSettings(kafka_bootstrap, retailers=(unique_name,)))
    try:  # a new process reads past verdicts back before accepting new ones
        wait(lambda: restarted.store.status.labels_loaded)
        assert restarted.publisher is not None
        assert restarted.publisher.publish(unique_name, "tx-3", "cust-3", False) == "already"
        assert len(restarted.store.review_queue()) == 19
    finally:
        restarted.stop()
    assert [(key, lb.tx_id, lb.is_fraud) for key, lb in labels_on(kafka_bootstrap, unique_name)
            ] == [(b"cust-3", "tx-3", True)]


@pytest.mark.integration
def test_the_reader_says_when_kafka_is_gone_and_recovers_by_itself(tmp_path):
    stack = Stack(StackConfig.ephemeral(tmp_path / "stack"))
    try:
        stack.up(["kafka"])
        bootstrap = stack.kafka.bootstrap
        retailer = "recover"
        produce_decisions(bootstrap, retailer, [
            (decision("before", retailer, 0.2, "allow", time.time()), "c1", 1.0)])
        rt = Runtime(UiSettings(bootstrap, retailers=(retailer,)))
        try:
            wait(lambda: len(rt.store.feed()) == 1)
            assert rt.store.status.reachable
            stack.down(["kafka"])
            wait(lambda: rt.store.status.reachable is False, timeout=60)
            assert [r.decision.tx_id for r in rt.store.feed()] == ["before"]  # kept
            stack.up(["kafka"])
            wait(lambda: rt.store.status.reachable, timeout=90)
            produce_decisions(bootstrap, retailer, [
                (decision("after", retailer, 0.9, "hold", time.time()), "c2", 2.0)])
            wait(lambda: len(rt.store.feed()) == 2, timeout=60)
        finally:
            rt.stop()
    finally:
        stack.down()
