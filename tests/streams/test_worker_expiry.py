"""Bounded state on real Kafka: a worker restored from its changelogs expires the keys that
are older than its horizon in event time, and only those, with tombstones."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

DAY = 86400.0
T0 = 1_767_225_600.0  # 2026-01-01


def test_a_restored_worker_tombstones_exactly_the_keys_past_its_horizon(
    kafka_bootstrap: str, unique_name: str, worker_factory: Callable[..., Any], kit: Any
):
    retailer = unique_name
    worker = worker_factory(retailer, "--state-horizon", str(2 * DAY),
                            "--scored-ttl", str(DAY)).start()

    def tx(i: int, at: float) -> dict:
        return kit.transaction(i, retailer, customer=f"cu{i}", payment_instrument=f"pi{i}",
                               device_id=f"dv{i}", ip=f"10.9.{i // 250}.{i % 250}",
                               occurred_at=at)

    # the recent ones first: the changelogs' order is the opposite of event-time order
    kept = [tx(i, T0 + 1.5 * DAY + i) for i in range(100, 150)]
    old = [tx(i, T0 + 60.0 * i) for i in range(100)]
    kit.produce_transactions(kafka_bootstrap, retailer, kept)
    kit.produce_transactions(kafka_bootstrap, retailer, old)
    seen = kit.collect(kafka_bootstrap, f"{retailer}.decisions",
                       lambda ms: len(kit.decisions_by_tx(ms)) >= 150, 90)
    assert len(kit.decisions_by_tx(seen)) == 150, worker.log_tail()
    time.sleep(2.0)  # expiry runs every second: with the clock at T0 + 1.5 days, nothing is due
    worker.kill()

    features_log = f"qsfraud-{retailer}-features-changelog"
    scored_log = f"qsfraud-{retailer}-scored-changelog"

    def tombstones(topic: str, until: Callable[[set[str]], bool], timeout: float) -> set[str]:
        gone: set[str] = set()

        def done(ms: list[Any]) -> bool:
            gone.clear()
            gone.update(json.loads(m.key()) for m in ms if m.value() is None)
            return until(gone)

        kit.collect(kafka_bootstrap, topic, done, timeout)
        return gone

    assert tombstones(features_log, lambda g: False, 3) == set()

    worker.start()
    # one transaction 3 days on: the clock's cutoff is T0 + 1 day, the old ones are behind it
    kit.produce_transactions(kafka_bootstrap, retailer, [tx(999, T0 + 3 * DAY)])
    kit.collect(kafka_bootstrap, f"{retailer}.decisions",
                lambda ms: "tx-999" in kit.decisions_by_tx(ms), 60)
    old_keys = {f"{kind}:{t[field]}" for t in old for kind, field in
                (("c", "customer_id"), ("p", "payment_instrument"), ("d", "device_id"),
                 ("i", "ip"))}
    gone = tombstones(features_log, lambda g: old_keys <= g, 60)
    assert gone == old_keys, worker.log_tail()
    gone_scored = tombstones(scored_log, lambda g: len(g) >= len(old), 30)
    assert gone_scored == {t["tx_id"] for t in old}
    text = worker.metrics()
    assert f'qsfraud_feature_entities{{retailer="{retailer}"}} {4 * (len(kept) + 1)}' in text
    assert f'qsfraud_scored_entries{{retailer="{retailer}"}} {len(kept) + 1}' in text
