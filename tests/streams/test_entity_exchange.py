"""The entity exchange's reader on real Kafka: it reads the exchange partitions of the
partitions its worker holds, and none while the worker holds them all (nobody asks it)."""

from __future__ import annotations

import asyncio

import pytest

from streams.app import EntityExchange
from streams.scoring import ScoringPipeline
from streams.settings import WorkerSettings
from streams.topics import ensure_topics, worker_topics

pytestmark = pytest.mark.integration


def test_the_reader_holds_the_workers_partitions_and_none_when_it_holds_every_one(
        kafka_bootstrap: str) -> None:
    settings = WorkerSettings("exchange_reader", kafka_bootstrap, partitions=4)
    ensure_topics(kafka_bootstrap, worker_topics(settings))

    async def assigned_for(exchange: EntityExchange, owned: set[int]) -> set[tuple[str, int]]:
        exchange.owned = frozenset(owned)
        consumer = await exchange._assign()
        return {(tp.topic, tp.partition) for tp in consumer.assignment()}

    async def check() -> None:
        exchange = EntityExchange(settings, ScoringPipeline("exchange_reader"))
        try:
            assert await assigned_for(exchange, {1, 3}) == {
                (topic, p) for topic in (exchange.requests_topic, exchange.fragments_topic)
                for p in (1, 3)}
            assert await assigned_for(exchange, {0, 1, 2, 3}) == set()
            assert len(await assigned_for(exchange, {2})) == 2  # reads again once it shares
        finally:
            assert exchange._consumer is not None
            await exchange._consumer.stop()
            await exchange.out.stop()

    asyncio.run(check())
