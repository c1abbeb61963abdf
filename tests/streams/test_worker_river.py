"""A worker on real Kafka runs the River pipeline its signed config names, end to end:
score, decide, learn from a label, checkpoint, restart with the same model."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from pqc.keys import KeyStore
from streams.config_stream import ConfigDocument, sign_config
from tests.streams.test_worker import publish_config, trust_args

LINEAR = [{"class": "preprocessing.StandardScaler"},
          {"class": "linear_model.LogisticRegression"}]


def test_a_river_pipeline_from_signed_config_learns_and_survives_a_restart(
    kafka_bootstrap: str, unique_name: str, admin: KeyStore,
    worker_factory: Callable[..., Any], kit: Any,
):
    retailer = unique_name
    config_topic = f"{unique_name}.config"
    doc = ConfigDocument.default().updated({"river_model": LINEAR}, version=1, scope=retailer)
    publish_config(kafka_bootstrap, config_topic, retailer, sign_config(doc, admin.identity))
    worker = worker_factory(retailer, *trust_args(admin, config_topic)).start()

    def decision_of(tx_id: str) -> dict:
        ms = kit.collect(kafka_bootstrap, f"{retailer}.decisions",
                         lambda ms: tx_id in kit.decisions_by_tx(ms), 60)
        return json.loads(kit.decisions_by_tx(ms)[tx_id][0])

    first = kit.transaction(1, retailer, customer="solo")
    kit.produce_transactions(kafka_bootstrap, retailer, [first])
    before = decision_of("tx-1")
    assert before["model_version"] == "local+0" and before["config_version"] == 1

    label = {"tx_id": "tx-1", "is_fraud": True, "source": "chargeback",
             "labelled_at": time.time()}
    p = kit.producer(kafka_bootstrap)
    p.produce(f"{retailer}.labels", key=b"solo", value=json.dumps(label).encode())
    p.flush(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and 'version="local+1"' not in worker.metrics():
        time.sleep(0.2)
    assert 'version="local+1"' in worker.metrics()

    kit.produce_transactions(kafka_bootstrap, retailer, [kit.transaction(2, retailer)])
    learned = decision_of("tx-2")
    assert learned["model_version"] == "local+1"

    time.sleep(2.5)  # a checkpoint (every 1 s here)
    worker.stop()
    worker.start()
    kit.produce_transactions(kafka_bootstrap, retailer, [kit.transaction(3, retailer)])
    after = decision_of("tx-3")
    assert after["model_version"] == "local+1"  # the River model's checkpoint survived
    assert after["config_version"] == 1
