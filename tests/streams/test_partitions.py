"""One topic registry: the CDC and the worker agree on names and partition counts, and a
worker meets an existing topic of another count by adapting or by one clear refusal."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from cdc.config import CdcConfig
from cdc.kafka_sink import KafkaTransactionalSink
from fraud.topics import DEFAULT_PARTITIONS
from qsfraud.worker_process import ROOT
from streams.settings import FEATURES_TABLE, SCORED_TABLE, WorkerSettings
from streams.topics import PartitionMismatch, TopicSpec, ensure_topics, settle_partitions


def cdc_config(retailer: str, bootstrap: str, **kafka: Any) -> CdcConfig:
    return CdcConfig.from_dict({
        "retailer": retailer,
        "source": {"kind": "mongo", "id": f"{retailer}-orders", "uri": "mongodb://h/?replicaSet=r",
                   "database": "shop", "collection": "orders"},
        "kafka": {"bootstrap_servers": bootstrap, **kafka},
        "mapping": {"fields": {"tx_id": "_id", "customer_id": "customer", "amount": "amount",
                               "occurred_at": "at", "payment_instrument": "card"}}})


def partition_counts(bootstrap: str, names: list[str]) -> dict[str, int]:
    topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30).topics
    return {name: len(topics[name].partitions) for name in names if name in topics}


def test_the_cdc_and_the_worker_use_the_same_names_and_partition_count_by_default() -> None:
    cdc = cdc_config("acme", "x")
    worker = WorkerSettings("acme", "x")
    assert cdc.topic == worker.transactions_topic
    assert cdc.kafka["partitions"] == worker.partitions == DEFAULT_PARTITIONS


def test_a_worker_started_after_the_cdc_uses_the_cdc_topics_count(
    kafka_bootstrap: str, unique_name: str, worker_factory: Callable[..., Any], kit: Any
) -> None:
    retailer = unique_name
    cdc = cdc_config(retailer, kafka_bootstrap, partitions=3)  # not the workers' default
    KafkaTransactionalSink(kafka_bootstrap, cdc.source_id, cdc.topic, cdc.dlq_topic,
                           partitions=int(cdc.kafka["partitions"])).ensure_topics()
    worker = worker_factory(retailer).start()  # no --partitions: adapts
    txs = [kit.transaction(i, retailer) for i in range(300)]
    kit.produce_transactions(kafka_bootstrap, retailer, txs)
    decided = kit.decisions_by_tx(kit.collect(
        kafka_bootstrap, f"{retailer}.decisions", lambda ms: len(ms) >= len(txs), 120))
    assert set(decided) == {tx["tx_id"] for tx in txs}, worker.log_tail()

    s = WorkerSettings(retailer, kafka_bootstrap)
    names = [s.transactions_topic, s.labels_topic, s.decisions_topic,
             s.changelog_topic(FEATURES_TABLE), s.changelog_topic(SCORED_TABLE)]
    assert partition_counts(kafka_bootstrap, names) == dict.fromkeys(names, 3)


def test_an_explicit_count_that_differs_is_refused_in_one_line(
    kafka_bootstrap: str, unique_name: str
) -> None:
    retailer = unique_name
    ensure_topics(kafka_bootstrap, [TopicSpec(f"{retailer}.transactions", 3, {})])
    settings = WorkerSettings(retailer, kafka_bootstrap, partitions=4)
    with pytest.raises(PartitionMismatch) as err:
        settle_partitions(settings)
    message = str(err.value)
    assert "\n" not in message
    assert f"{retailer}.transactions has 3 partitions" in message
    assert "asked for 4" in message and "--partitions 3" in message
    # adapting, the same topic is fine
    adapted = settle_partitions(WorkerSettings(retailer, kafka_bootstrap, partitions=4,
                                               adapt_partitions=True))
    assert adapted.partitions == 3

    # the CLI prints that one line and exits 2, before anything is created
    run = subprocess.run([sys.executable, "-m", "qsfraud", "worker", "--retailer", retailer,
                          "--bootstrap", kafka_bootstrap, "--partitions", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("qsfraud worker:")]
    assert lines == [f"qsfraud worker: {message}"], run.stderr
    assert f"{retailer}.labels" not in partition_counts(
        kafka_bootstrap, [f"{retailer}.labels"])


def test_a_changelog_with_another_count_than_the_input_is_refused(
    kafka_bootstrap: str, unique_name: str
) -> None:
    retailer = unique_name
    settings = WorkerSettings(retailer, kafka_bootstrap, adapt_partitions=True)
    changelog = settings.changelog_topic(FEATURES_TABLE)
    ensure_topics(kafka_bootstrap, [TopicSpec(f"{retailer}.transactions", 2, {}),
                                    TopicSpec(changelog, 4, {})])
    with pytest.raises(PartitionMismatch) as err:
        settle_partitions(settings)
    message = str(err.value)
    assert "\n" not in message
    assert f"topic {changelog} has 4 partitions, the worker needs 2" in message
