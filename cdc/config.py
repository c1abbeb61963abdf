"""The CDC config file (TOML, or YAML with the same structure): one source per file.

See ``examples/cdc/mysql.toml`` and ``examples/cdc/mongo.toml`` for documented samples.

>>> cfg = CdcConfig.from_dict({
...     "retailer": "acme",
...     "source": {"kind": "mongo", "id": "acme-orders", "uri": "mongodb://h/?replicaSet=rs",
...                "database": "shop", "collection": "orders"},
...     "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
...     "mapping": {"static": {"currency": "EUR"}, "fields": {"tx_id": "_id",
...                 "customer_id": "customer", "amount": "amount", "occurred_at": "at",
...                 "payment_instrument": "card"}}})
>>> cfg.topic, cfg.dlq_topic, cfg.mapper.static["retailer_id"]
('acme.transactions', 'acme.transactions.dlq', 'acme')
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cdc.encoder import ChangeEncoder
from cdc.kafka_sink import DEFAULT_OFFSETS_TOPIC
from cdc.mapping import ConfigError, RowMapper
from cdc.source import HISTORY_LOST_ACTIONS, SNAPSHOT_MODES, Source
from fraud.topics import DEFAULT_PARTITIONS, RetailerTopics

KINDS: Final = ("mysql", "mongo")
TOMBSTONES: Final = ("auto", "always", "never")
MYSQL_KEYS: Final = frozenset({"host", "port", "user", "password", "password_env", "database",
                               "table", "server_id", "primary_key"})
MONGO_KEYS: Final = frozenset({"uri", "uri_env", "database", "collection", "pre_images",
                               "max_await_ms"})
COMMON_KEYS: Final = frozenset({"kind", "id", "snapshot", "on_history_lost", "reader"})
KAFKA_KEYS: Final = frozenset({"bootstrap_servers", "partitions", "offsets_topic",
                               "commit_interval_ms", "commit_max_events", "commit_gap_ms", "key",
                               "tombstones", "producer", "transaction_timeout_ms"})


def _require(table: dict[str, Any], key: str, where: str) -> Any:
    value = table.get(key)
    if value is None or value == "":
        raise ConfigError(f"{where}.{key} is required")
    return value


def _secret(table: dict[str, Any], key: str, where: str) -> str:
    env_name = table.get(f"{key}_env")
    if env_name:
        value = os.environ.get(str(env_name))
        if value is None:
            raise ConfigError(f"{where}.{key}_env names ${env_name}, which is not set")
        return value
    return str(_require(table, key, where))


@dataclass
class CdcConfig:
    """A validated config: the source's settings, Kafka output and the row mapping."""

    retailer: str
    source: dict[str, Any]
    kafka: dict[str, Any]
    mapper: RowMapper
    metrics_interval_s: float = 10.0
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def reader(self) -> str:
        return str(self.source.get("reader", "process"))

    @property
    def source_id(self) -> str:
        return str(self.source["id"])

    @property
    def topic(self) -> str:
        return RetailerTopics(self.retailer).transactions

    @property
    def dlq_topic(self) -> str:
        return RetailerTopics(self.retailer).transactions_dlq

    @classmethod
    def load(cls, path: str | Path) -> CdcConfig:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        else:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a table at the top level")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CdcConfig:
        unknown = set(data) - {"retailer", "source", "kafka", "mapping", "metrics_interval_s"}
        if unknown:
            raise ConfigError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
        retailer = str(_require(data, "retailer", "config"))
        if not all(c.isalnum() or c in "-_" for c in retailer):
            raise ConfigError(f"retailer must be letters, digits, - or _; got {retailer!r}")
        source = dict(data.get("source") or {})
        kind = source.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"source.kind must be one of {', '.join(KINDS)}; got {kind!r}")
        allowed = COMMON_KEYS | (MYSQL_KEYS if kind == "mysql" else MONGO_KEYS)
        unknown = set(source) - allowed
        if unknown:
            raise ConfigError(f"source: unknown keys for kind {kind}: {', '.join(sorted(unknown))}")
        _require(source, "id", "source")
        if source.setdefault("snapshot", "initial") not in SNAPSHOT_MODES:
            raise ConfigError(f"source.snapshot must be one of {', '.join(SNAPSHOT_MODES)}")
        if source.setdefault("on_history_lost", "fail") not in HISTORY_LOST_ACTIONS:
            raise ConfigError(
                f"source.on_history_lost must be one of {', '.join(HISTORY_LOST_ACTIONS)}")
        if source.setdefault("reader", "process") not in ("process", "thread"):
            raise ConfigError('source.reader must be "process" or "thread"')
        kafka = dict(data.get("kafka") or {})
        unknown = set(kafka) - KAFKA_KEYS
        if unknown:
            raise ConfigError(f"kafka: unknown keys {', '.join(sorted(unknown))}")
        _require(kafka, "bootstrap_servers", "kafka")
        # the workers' count, so that they find the topic as they would create it
        kafka.setdefault("partitions", DEFAULT_PARTITIONS)
        kafka.setdefault("offsets_topic", DEFAULT_OFFSETS_TOPIC)
        kafka.setdefault("commit_interval_ms", 100)
        kafka.setdefault("commit_max_events", 10_000)
        kafka.setdefault("commit_gap_ms", 10)
        kafka.setdefault("key", "customer_id")
        kafka.setdefault("tombstones", "auto")
        kafka.setdefault("transaction_timeout_ms", 600_000)
        if kafka["tombstones"] not in TOMBSTONES:
            raise ConfigError(f"kafka.tombstones must be one of {', '.join(TOMBSTONES)}")
        mapping = dict(data.get("mapping") or {})
        static = dict(mapping.get("static") or {})
        static.setdefault("retailer_id", retailer)
        mapping["static"] = static
        mapper = RowMapper.from_config(mapping)
        return cls(retailer=retailer, source=source, kafka=kafka, mapper=mapper,
                   metrics_interval_s=float(data.get("metrics_interval_s", 10.0)), raw=data)

    def change_encoder(self, source: Source, tombstones: bool) -> ChangeEncoder:
        """The encoder that turns ``source``'s transactions into this config's records."""
        return ChangeEncoder(self.mapper, {**source.describe(), "id": self.source_id},
                             key_field=str(self.kafka["key"]), tombstones=tombstones)

    def build_source(self) -> Source:
        """The configured source (connections are opened lazily)."""
        s = self.source
        common = {"snapshot_mode": s["snapshot"], "on_history_lost": s["on_history_lost"]}
        if s["kind"] == "mysql":
            from cdc.mysql_source import MySQLBinlogSource

            pk = s.get("primary_key")
            return MySQLBinlogSource(
                self.source_id, host=str(s.get("host", "127.0.0.1")), port=int(s.get("port", 3306)),
                user=str(_require(s, "user", "source")), password=_secret(s, "password", "source"),
                database=str(_require(s, "database", "source")),
                table=str(_require(s, "table", "source")),
                server_id=int(s["server_id"]) if "server_id" in s else None,
                primary_key=[pk] if isinstance(pk, str) else pk, **common,
            )
        from cdc.mongo_source import MongoChangeStreamSource

        return MongoChangeStreamSource(
            self.source_id, uri=_secret(s, "uri", "source"),
            database=str(_require(s, "database", "source")),
            collection=str(_require(s, "collection", "source")),
            pre_images=bool(s.get("pre_images", True)),
            max_await_ms=int(s.get("max_await_ms", 100)), **common,
        )
