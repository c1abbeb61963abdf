"""Live configuration: versioned documents, signed by an admin (ML-DSA-65), on a compacted topic.

A document (``ConfigDocument.to_dict``)::

    {"v": 1, "kind": "qsfraud-config", "version": 7, "scope": "*",
     "policy": {...fraud.decisions.PolicyConfig without its version...},
     "fl": {"sync_interval_s": 300.0}, "issued_by": "admin-1", "issued_at": 1767225600.0}

travels as a :func:`pqc.sign_document` blob (purpose ``qsfraud-config``, sequence = version),
keyed by its scope (``*`` for every retailer, or one retailer id), so compaction keeps the
newest document per scope. :class:`ConfigApplier` checks each record: signature by a trusted
key whose role is ``admin``, purpose, time window, the schema, and that the version is newer
than the applied one; then it applies the document in one step, or rejects it (the previous
configuration stays) with a reason.

>>> import tempfile
>>> from pqc.keys import init_keystore
>>> admin = init_keystore(tempfile.mkdtemp(), "admin-1", "admin")
>>> applied = []
>>> applier = ConfigApplier("acme", admin.registry, on_apply=applied.append)
>>> doc = ConfigDocument.default().updated({"policy.thresholds.verify": 0.3}, version=1)
>>> applier.offer(sign_config(doc, admin.identity), b"*").status, applied[-1].version
('applied', 1)
>>> applier.offer(sign_config(doc, admin.identity), b"*").reason
'stale'
>>> applier.offer(json.dumps(doc.to_dict()).encode(), b"*").reason
'unsigned'
>>> applier.current.policy.thresholds.verify
0.3
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from fraud.decisions import PolicyConfig
from fraud.schema import SchemaError
from pqc import (
    EnvelopeError,
    MalformedEnvelope,
    OutsideTimeWindow,
    Registry,
    Replay,
    TamperedEnvelope,
    TimeWindow,
    UnauthorizedSender,
    UnknownSender,
    WrongPurpose,
    sign_document,
    verify_document,
)
from pqc.freshness import InMemoryFreshness
from pqc.keys import Identity
from streams.topics import watermarks

log = logging.getLogger(__name__)

PURPOSE: Final = "qsfraud-config"
KIND: Final = "qsfraud-config"
ADMIN_ROLES: Final = ("admin",)
DEFAULT_FL_SYNC_S: Final = 300.0
POLICY_FIELDS: Final = ("thresholds", "block", "allow", "rules", "model", "top_reasons",
                        "river_model")


@dataclass(frozen=True)
class ConfigDocument:
    """One validated configuration version for a scope (``*`` or a retailer id)."""

    version: int = 0
    scope: str = "*"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    fl_sync_interval_s: float = DEFAULT_FL_SYNC_S
    issued_by: str = ""
    issued_at: float = 0.0

    @classmethod
    def default(cls) -> ConfigDocument:
        """Version 0: the built-in defaults, in effect until a signed document arrives."""
        return cls()

    @classmethod
    def from_dict(cls, d: Any) -> ConfigDocument:
        """Validate plain data; ``SchemaError`` names the bad field.

        >>> ConfigDocument.from_dict({"v": 1, "kind": "qsfraud-config", "version": 2,
        ...     "scope": "*", "policy": {"thresholds": {"verify": 0.9, "hold": 0.1}}})
        Traceback (most recent call last):
        ...
        fraud.schema.SchemaError: thresholds: need verify <= hold <= block
        """
        if not isinstance(d, Mapping):
            raise SchemaError("config", f"expected an object, got {type(d).__name__}")
        if d.get("v") != 1 or d.get("kind") != KIND:
            raise SchemaError("kind", f"not a v1 {KIND} document")
        unknown = set(d) - {"v", "kind", "version", "scope", "policy", "fl", "issued_by",
                            "issued_at"}
        if unknown:
            raise SchemaError(sorted(unknown)[0], "unknown config field")
        version = d.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise SchemaError("version", f"expected an integer >= 1, got {version!r}")
        scope = d.get("scope", "*")
        if not isinstance(scope, str) or not scope:
            raise SchemaError("scope", "expected '*' or a retailer id")
        policy = d.get("policy") or {}
        if not isinstance(policy, Mapping):
            raise SchemaError("policy", "expected an object")
        if "version" in policy and policy["version"] != version:
            raise SchemaError("policy.version", "must equal the document version (or be absent)")
        fl = d.get("fl") or {}
        if not isinstance(fl, Mapping) or set(fl) - {"sync_interval_s"}:
            raise SchemaError("fl", "expected {\"sync_interval_s\": seconds}")
        sync = fl.get("sync_interval_s", DEFAULT_FL_SYNC_S)
        if isinstance(sync, bool) or not isinstance(sync, int | float) or not (
            math.isfinite(sync) and sync > 0
        ):
            raise SchemaError("fl.sync_interval_s", f"expected seconds > 0, got {sync!r}")
        issued_at = d.get("issued_at", 0.0)
        if isinstance(issued_at, bool) or not isinstance(issued_at, int | float):
            raise SchemaError("issued_at", "expected epoch seconds")
        return cls(
            version=version,
            scope=scope,
            policy=PolicyConfig.from_dict({**policy, "version": version}),
            fl_sync_interval_s=float(sync),
            issued_by=str(d.get("issued_by") or ""),
            issued_at=float(issued_at),
        )

    def to_dict(self) -> dict[str, Any]:
        policy = self.policy.to_dict()
        for key in ("v", "kind", "version"):
            policy.pop(key, None)
        return {
            "v": 1,
            "kind": KIND,
            "version": self.version,
            "scope": self.scope,
            "policy": policy,
            "fl": {"sync_interval_s": self.fl_sync_interval_s},
            "issued_by": self.issued_by,
            "issued_at": self.issued_at,
        }

    def updated(
        self, changes: Mapping[str, Any], version: int, scope: str | None = None,
        issued_by: str = "", issued_at: float | None = None,
    ) -> ConfigDocument:
        """A new, validated version with dotted-path ``changes`` applied.

        Paths start with ``policy.`` or ``fl.``; ``policy.`` may be left out for policy
        fields (``thresholds.verify``, ``rules``, ``block.devices``, ``model.l2``, ...).

        >>> doc = ConfigDocument.default().updated(
        ...     {"thresholds.block": 0.99, "fl.sync_interval_s": 60}, version=4, scope="acme")
        >>> doc.version, doc.scope, doc.policy.thresholds.block, doc.fl_sync_interval_s
        (4, 'acme', 0.99, 60.0)
        """
        d = self.to_dict()
        for path, value in changes.items():
            parts = path.split(".")
            if parts[0] in POLICY_FIELDS:
                parts = ["policy", *parts]
            if parts[0] not in ("policy", "fl") or len(parts) < 2:
                raise SchemaError(path, "use policy.<field>[.<key>] or fl.sync_interval_s")
            node = d
            for part in parts[:-1]:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
            node[parts[-1]] = value
        d["version"] = version
        d["scope"] = self.scope if scope is None else scope
        d["issued_by"] = issued_by
        d["issued_at"] = time.time() if issued_at is None else issued_at
        return ConfigDocument.from_dict(d)

    def summary(self) -> str:
        t = self.policy.thresholds
        return (f"v{self.version} scope={self.scope} thresholds={t.verify}/{t.hold}/{t.block} "
                f"rules={len(self.policy.rules)} fl_sync={self.fl_sync_interval_s:g}s")


def sign_config(doc: ConfigDocument, signer: Identity, now: float | None = None) -> bytes:
    """The signed blob to publish (keyed by ``doc.scope``)."""
    payload = json.dumps(doc.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    return sign_document(payload, signer, PURPOSE, seq=doc.version, now=now)


@dataclass(frozen=True)
class Outcome:
    """What happened to one config record: ``applied``, ``ignored`` or ``rejected``."""

    status: str
    reason: str = ""
    error: str = ""
    version: int | None = None
    signer: str | None = None
    document: ConfigDocument | None = None


def check_config(
    blob: bytes | None,
    registry: Registry | None,
    *,
    window: TimeWindow,
    freshness: InMemoryFreshness | None = None,
    now: float | None = None,
) -> Outcome:
    """Verify signature, role, purpose, time and schema; ``document`` is set if all pass.

    ``reason`` on failure: ``empty``, ``unsigned``, ``malformed``, ``untrusted``,
    ``bad-signature``, ``unauthorized``, ``wrong-purpose``, ``stale``, ``invalid``.
    """
    if blob is None:
        return Outcome("rejected", "empty", "tombstone")
    if not blob.startswith(b"QSFE"):
        return Outcome("rejected", "unsigned", "not a signed qsfraud document")
    if registry is None:
        return Outcome("rejected", "untrusted", "this worker trusts no admin keys")
    try:
        payload, meta = verify_document(
            blob, registry, freshness=freshness or InMemoryFreshness(), purpose=PURPOSE,
            roles=ADMIN_ROLES, window=window, now=now,
        )
    except MalformedEnvelope as exc:
        return Outcome("rejected", "malformed", str(exc))
    except UnknownSender as exc:
        return Outcome("rejected", "untrusted", str(exc))
    except TamperedEnvelope as exc:
        return Outcome("rejected", "bad-signature", str(exc))
    except UnauthorizedSender as exc:
        return Outcome("rejected", "unauthorized", str(exc))
    except WrongPurpose as exc:
        return Outcome("rejected", "wrong-purpose", str(exc))
    except (Replay, OutsideTimeWindow) as exc:
        return Outcome("rejected", "stale", str(exc))
    except EnvelopeError as exc:
        return Outcome("rejected", "malformed", str(exc))
    try:
        doc = ConfigDocument.from_dict(json.loads(payload))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Outcome("rejected", "invalid", f"not JSON: {exc}", signer=meta.sender)
    except SchemaError as exc:
        return Outcome("rejected", "invalid", str(exc), signer=meta.sender)
    if doc.version != meta.sequence:
        return Outcome("rejected", "invalid", "signed sequence differs from the version",
                       doc.version, meta.sender)
    return Outcome("applied", version=doc.version, signer=meta.sender,
                   document=replace(doc, issued_by=meta.sender))


class ConfigApplier:
    """The config state machine of one worker: offer records in topic order.

    Not thread-safe by itself: one follower thread offers; readers only read ``current``
    (one reference, swapped atomically).
    """

    def __init__(
        self,
        retailer: str,
        registry: Registry | None,
        on_apply: Callable[[ConfigDocument], None] | None = None,
        window: TimeWindow | None = None,
        initial: ConfigDocument | None = None,
    ) -> None:
        self.retailer = retailer
        self.registry = registry
        self.on_apply = on_apply
        self.window = window or TimeWindow(max_age_s=365 * 86400.0, max_future_s=120.0)
        self.current = initial or ConfigDocument.default()
        self.freshness = InMemoryFreshness()
        self.applied = 0
        self.rejected = 0

    def offer(self, blob: bytes | None, key: bytes | None, now: float | None = None) -> Outcome:
        outcome = check_config(blob, self.registry, window=self.window,
                               freshness=self.freshness, now=now)
        doc = outcome.document
        if doc is not None:
            if doc.scope not in ("*", self.retailer):
                return Outcome("ignored", "other-scope", version=doc.version,
                               signer=outcome.signer)
            if key is not None and key.decode("utf-8", "replace") != doc.scope:
                outcome = Outcome("rejected", "invalid", "record key differs from the scope",
                                  doc.version, outcome.signer)
            elif doc.version <= self.current.version:
                outcome = Outcome("rejected", "stale",
                                  f"version {doc.version} is not newer than the applied "
                                  f"{self.current.version}", doc.version, outcome.signer)
            else:
                self.current = doc
                self.applied += 1
                if self.on_apply is not None:
                    self.on_apply(doc)
                log.info("config applied: %s (signed by %s)", doc.summary(), outcome.signer)
                return outcome
        self.rejected += 1
        log.warning("config rejected (%s): %s", outcome.reason, outcome.error)
        return outcome


def rejection_report(
    outcome: Outcome, *, retailer: str, worker: str, topic: str, partition: int, offset: int,
    key: bytes | None,
) -> dict[str, Any]:
    """The JSON record a worker writes to ``qsfraud.config.rejected``."""
    return {
        "v": 1,
        "kind": "config-rejected",
        "reason": outcome.reason,
        "error": outcome.error,
        "version": outcome.version,
        "signer": outcome.signer,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "retailer_id": retailer,
        "worker": worker,
        "rejected_at": time.time(),
    }


class ConfigFollower:
    """A thread that reads the whole config topic from the beginning, then follows it.

    Outside the consumer group on purpose: every worker must see every config record, while
    the group splits the data partitions. ``ready`` is set once the records present at start
    have been offered, so the first decision already uses the newest valid configuration.
    Rejections are reported on ``rejected_topic``.
    """

    def __init__(
        self, bootstrap: str, topic: str, rejected_topic: str, applier: ConfigApplier,
        worker: str, on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.rejected_topic = rejected_topic
        self.applier = applier
        self.worker = worker
        self.on_outcome = on_outcome
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="config-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "qsfraud-config",
                             "enable.auto.commit": False, "isolation.level": "read_committed"})
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        try:
            tp = TopicPartition(self.topic, 0)
            _low, high = watermarks(consumer, tp)
            if high <= 0:
                self.ready.set()
            consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            while not self._stop.is_set():
                msg = consumer.poll(0.1)
                if msg is None:
                    producer.poll(0)
                    continue
                if msg.error() is not None:
                    log.warning("config topic: %s", msg.error())
                    continue
                key = msg.key()
                offset = msg.offset() or 0
                outcome = self.applier.offer(msg.value(), key)
                if outcome.status == "rejected":
                    report = rejection_report(
                        outcome, retailer=self.applier.retailer, worker=self.worker,
                        topic=self.topic, partition=msg.partition() or 0, offset=offset, key=key)
                    producer.produce(self.rejected_topic, key=key,
                                     value=json.dumps(report, separators=(",", ":")).encode())
                    producer.poll(0)
                if self.on_outcome is not None:
                    self.on_outcome(outcome)
                if offset >= high - 1:
                    self.ready.set()
        except Exception:  # the worker keeps its last config; the error is logged
            log.exception("config follower stopped")
        finally:
            self.ready.set()
            producer.flush(5)
            consumer.close()
