"""The names of every Kafka topic qsfraud uses, and their default partition counts.

One registry for the CDC, the streams workers, federated learning and the UI: pure names,
no I/O (creating topics is the job of whoever writes them first). A retailer's data topics
are keyed by ``customer_id`` and share one partition count with the workers' table
changelogs (faust co-partitions a table with its input), so the CDC creates
``<R>.transactions`` with the same default count the workers expect.

>>> t = RetailerTopics("acme")
>>> t.transactions, t.labels, t.decisions, t.transactions_dlq, t.streams_dlq
('acme.transactions', 'acme.labels', 'acme.decisions', 'acme.transactions.dlq', 'acme.streams.dlq')
>>> t.entity_requests, t.entity_fragments
('acme.entity-requests', 'acme.entity-fragments')
>>> t.checkpoints, t.app_id, t.changelog("features")
('acme.checkpoints', 'qsfraud-acme', 'qsfraud-acme-features-changelog')
>>> [t.name for t in SHARED_TOPICS]
['qsfraud.config', 'qsfraud.config.rejected', 'qsfraud.fl.updates', 'qsfraud.fl.global']
>>> CDC_OFFSETS
'qsfraud.cdc.offsets'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DEFAULT_PARTITIONS: Final = 4
"""Partitions of a retailer's data topics (transactions, labels, decisions) and of its
workers' changelogs, unless the transactions topic already exists with another count (the
workers then take that one)."""

CONFIG: Final = "qsfraud.config"
"""Signed live configuration documents, keyed by scope (``*`` or a retailer); compacted."""
CONFIG_REJECTED: Final = "qsfraud.config.rejected"
"""Why a worker rejected a config document (for the admin and the UI)."""
FL_UPDATES: Final = "qsfraud.fl.updates"
"""Federated learning: each retailer's sealed model update, to the aggregator."""
FL_GLOBAL: Final = "qsfraud.fl.global"
"""Federated learning: the aggregator's signed global model, to every retailer."""
CDC_OFFSETS: Final = "qsfraud.cdc.offsets"
"""The CDC's source positions (one compacted record per source), written in its
transactions."""


@dataclass(frozen=True)
class SharedTopic:
    """A topic shared by every retailer, with its partition count and whether compacted."""

    name: str
    partitions: int
    compacted: bool


SHARED_TOPICS: Final = (
    SharedTopic(CONFIG, 1, True),
    SharedTopic(CONFIG_REJECTED, 1, False),
    SharedTopic(FL_UPDATES, 1, False),
    SharedTopic(FL_GLOBAL, 1, True),
)


@dataclass(frozen=True)
class RetailerTopics:
    """The topics of one retailer (its id is checked by whoever builds these from input)."""

    retailer: str

    @property
    def transactions(self) -> str:
        """CDC envelopes (or bare transactions), keyed by customer_id; workers read it."""
        return f"{self.retailer}.transactions"

    @property
    def transactions_dlq(self) -> str:
        """The CDC's dead letters (rows it could not map)."""
        return f"{self.transactions}.dlq"

    @property
    def labels(self) -> str:
        """Fraud labels, keyed by the transaction's customer_id; workers learn from them."""
        return f"{self.retailer}.labels"

    @property
    def decisions(self) -> str:
        """The workers' decisions, keyed as the transaction was."""
        return f"{self.retailer}.decisions"

    @property
    def streams_dlq(self) -> str:
        """The workers' dead letters (input they could not decide or learn from)."""
        return f"{self.retailer}.streams.dlq"

    @property
    def checkpoints(self) -> str:
        """The workers' model checkpoints (compacted, one partition)."""
        return f"{self.retailer}.checkpoints"

    @property
    def entity_requests(self) -> str:
        """Workers asking an entity's owner for its features of a transaction; a record
        goes to the entity's home partition (as many partitions as the transactions)."""
        return f"{self.retailer}.entity-requests"

    @property
    def entity_fragments(self) -> str:
        """The owners' answers, on the partition of the transaction they are for."""
        return f"{self.retailer}.entity-fragments"

    @property
    def app_id(self) -> str:
        """The workers' faust app id and consumer group."""
        return f"qsfraud-{self.retailer}"

    def changelog(self, table: str) -> str:
        """faust's name for the changelog topic of the workers' ``table``."""
        return f"{self.app_id}-{table}-changelog"
