"""Settings of one retailer's worker, and the names of the topics it uses.

>>> s = WorkerSettings(retailer="acme", bootstrap="127.0.0.1:9092")
>>> s.app_id, s.transactions_topic, s.decisions_topic, s.labels_topic
('qsfraud-acme', 'acme.transactions', 'acme.decisions', 'acme.labels')
>>> s.dlq_topic, s.checkpoints_topic, s.config_topic, s.config_rejected_topic
('acme.streams.dlq', 'acme.checkpoints', 'qsfraud.config', 'qsfraud.config.rejected')
>>> s.changelog_topic("features")
'qsfraud-acme-features-changelog'
>>> WorkerSettings(retailer="no spaces", bootstrap="x")
Traceback (most recent call last):
...
ValueError: retailer id must match [A-Za-z0-9][A-Za-z0-9_-]{0,63}, got 'no spaces'
>>> WorkerSettings(retailer="acme", bootstrap="x", state_horizon_s=3600)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: the state horizon (3600 s) must be longer than the longest feature window ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fraud import topics
from fraud.features import WINDOWS
from fraud.schema import DEFAULT_BOUNDS, InputBounds
from fraud.topics import DEFAULT_PARTITIONS, RetailerTopics

RETAILER_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
DEFAULT_KEYS_DIR: Final = Path(".qsfraud/keys")
DEFAULT_ADMIN_KEYS: Final = DEFAULT_KEYS_DIR / "admin"
DEFAULT_TRUST_REGISTRY: Final = DEFAULT_ADMIN_KEYS / "registry.json"
CONFIG_TOPIC: Final = topics.CONFIG
FEATURES_TABLE: Final = "features"
SCORED_TABLE: Final = "scored"
INPUT_FORMATS: Final = ("auto", "debezium")


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs; the CLI fills it from flags and the environment."""

    retailer: str
    bootstrap: str
    partitions: int = DEFAULT_PARTITIONS
    adapt_partitions: bool = False
    """Take the partition count of ``<R>.transactions`` when it exists (``partitions`` is
    then only the count for a new topic): see :func:`streams.topics.settle_partitions`."""
    web_port: int = 6066
    web_host: str = "127.0.0.1"
    datadir: Path = Path(".qsfraud/streams")
    trust_registry: Path | None = DEFAULT_TRUST_REGISTRY
    config_topic: str = CONFIG_TOPIC
    batch_size: int = 500
    batch_within_s: float = 0.01
    scored_ttl_s: float = 7 * 86400.0
    """The label delay: how long after a transaction its label may still come."""
    scored_max_entries: int = 2_000_000
    state_horizon_s: float = 8 * 86400.0
    """Entity state and ``scored`` entries expire this long after their last event, in
    event time (``occurred_at``); longer than the longest feature window and the label
    delay."""
    checkpoint_interval_s: float = 10.0
    config_max_age_s: float = 365 * 86400.0
    config_replay_timeout_s: float = 30.0
    input_format: str = "auto"
    """``auto``: qsfraud envelopes, bare transactions, and Debezium events by their shape;
    ``debezium``: Debezium events only (a null value is the tombstone after a delete)."""
    mapping: Path | None = None
    """A file with the ``[mapping]`` table for Debezium rows (None: canonical field names)."""
    input_bounds: InputBounds = DEFAULT_BOUNDS
    """What an input record must meet (size, ids, amounts, time window); see InputBounds."""
    fl_identity: Path | None = None
    """Federated learning (off without it): the retailer's key store (``qsfraud keys init``)."""
    fl_aggregator: Path | None = None
    """The aggregator's public-key bundle (``qsfraud keys show --export``): updates are sealed
    to its KEM key."""
    fl_trust: Path | None = None
    """The registry that says which aggregator signs global models."""
    fl_sync_labels: int = 500
    """Send an update after this many labels (or the live config's ``fl.sync_interval_s``)."""
    fl_updates_topic: str = topics.FL_UPDATES
    fl_global_topic: str = topics.FL_GLOBAL
    fl_watch_key: Path | None = None
    """The consortium key of the cross-retailer watchlist, sealed to this retailer by an admin
    (``fl.watchlist.seal_watch_key``). Without it, ``<fl_identity>/watch-key.sealed`` if that
    exists; without either the watchlist is off (fl/README.md, "Cross-retailer watchlist")."""
    fl_watch_min_score: float = 0.0
    """A listed transaction is held only if the own model scores it at least this."""
    fl_watch_report: str = "hold"
    """What the retailer reports: ``hold`` (its holds and blocks) or ``verify`` (also what it
    sent to step-up)."""
    fl_watch_new_devices: bool = False
    """Also report devices seen here for the first time, and hold a transaction whose device
    is new here and was new at another retailer lately (fl/README.md, "New devices")."""
    fl_watch_new_min_score: float = 0.2
    """... if the own model scores it at least this (``fraud.decisions.NEW_DEVICE_MIN_SCORE``)."""
    api_tokens: Path | None = None
    """The HTTP API's tokens file (SHA-256 digests per retailer; :mod:`streams.api`); without
    one every API request but ``/health`` is refused (401)."""
    api_cert: Path | None = None
    """TLS certificate (PEM chain) of the web server: with it, ``/metrics`` and the API are
    served over HTTPS only."""
    api_key: Path | None = None
    api_url: str | None = None
    """The URL other workers reach this one at (default: scheme, ``web_host``, ``web_port``)."""
    api_max_body_bytes: int = 1024 * 1024
    api_max_wait_ms: int = 5000
    api_default_wait_ms: int = 2000

    def __post_init__(self) -> None:
        if not RETAILER_ID.fullmatch(self.retailer):
            raise ValueError(
                f"retailer id must match {RETAILER_ID.pattern}, got {self.retailer!r}"
            )
        if self.partitions < 1:
            raise ValueError("partitions must be >= 1")
        if not 0 <= self.api_default_wait_ms <= self.api_max_wait_ms:
            raise ValueError("api_default_wait_ms must be within 0..api_max_wait_ms")
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format: one of {', '.join(INPUT_FORMATS)}")
        fl_paths = (self.fl_identity, self.fl_aggregator, self.fl_trust)
        if any(p is not None for p in fl_paths) and not all(p is not None for p in fl_paths):
            raise ValueError("federated learning needs --fl-identity, --fl-aggregator and "
                             "--fl-trust together")
        if self.fl_sync_labels < 1:
            raise ValueError("fl_sync_labels must be >= 1")
        if self.fl_watch_key is not None and self.fl_identity is None:
            raise ValueError("--fl-watch-key needs federated learning (--fl-identity ...)")
        if not 0.0 <= self.fl_watch_min_score <= 1.0:
            raise ValueError("fl_watch_min_score must be within 0..1")
        if not 0.0 <= self.fl_watch_new_min_score <= 1.0:
            raise ValueError("fl_watch_new_min_score must be within 0..1")
        if self.fl_watch_report not in ("hold", "verify"):
            raise ValueError("fl_watch_report: hold or verify")
        longest_window = max(seconds for seconds, _ in WINDOWS)
        if not self.state_horizon_s > max(longest_window, self.scored_ttl_s):
            raise ValueError(
                f"the state horizon ({self.state_horizon_s:g} s) must be longer than the "
                f"longest feature window ({longest_window:g} s) and the label delay "
                f"(scored TTL, {self.scored_ttl_s:g} s)")

    @property
    def fl_enabled(self) -> bool:
        return self.fl_identity is not None

    @property
    def topics(self) -> RetailerTopics:
        """The retailer's topic names (:mod:`fraud.topics`)."""
        return RetailerTopics(self.retailer)

    @property
    def app_id(self) -> str:
        """The faust app id, also the consumer group of the retailer's workers."""
        return self.topics.app_id

    @property
    def transactions_topic(self) -> str:
        return self.topics.transactions

    @property
    def decisions_topic(self) -> str:
        return self.topics.decisions

    @property
    def labels_topic(self) -> str:
        return self.topics.labels

    @property
    def dlq_topic(self) -> str:
        """Bad input records (not CDC's own ``<R>.transactions.dlq``)."""
        return self.topics.streams_dlq

    @property
    def checkpoints_topic(self) -> str:
        return self.topics.checkpoints

    @property
    def config_rejected_topic(self) -> str:
        """``qsfraud.config.rejected`` for the default config topic."""
        return f"{self.config_topic}.rejected"

    def changelog_topic(self, table: str) -> str:
        """faust's name for a table's changelog topic."""
        return self.topics.changelog(table)
