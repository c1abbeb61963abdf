"""Replaying the config topic as a worker would: what is in effect, and what became of each record.

Shared by ``qsfraud config show|set|history`` and the UI's admin page, so both see the same
outcome for every record (``applied``, ``ignored`` for another scope, ``rejected`` with a
reason) and pick the same next version.

>>> import tempfile
>>> from pqc.keys import init_keystore
>>> admin = init_keystore(tempfile.mkdtemp(), "admin-1", "admin")
>>> doc = ConfigDocument.default().updated({"thresholds.verify": 0.4}, version=1)
>>> other = ConfigDocument.default().updated({}, version=5, scope="zeta")
>>> records = [(0, b"*", sign_config(doc, admin.identity)), (1, b"*", b"{}"),
...            (2, b"zeta", sign_config(other, admin.identity))]
>>> r = replay(records, "acme", admin.registry)
>>> r.current.version, r.next_version, [e.outcome.status for e in r.entries]
(1, 6, ['applied', 'rejected', 'ignored'])
>>> r.entries[1].outcome.reason
'unsigned'
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from pqc import Registry, TimeWindow
from streams.config_stream import ConfigApplier, ConfigDocument, Outcome, sign_config

__all__ = ["HISTORY_WINDOW", "ConfigReplay", "HistoryEntry", "read_config_records", "replay",
           "sign_config"]

HISTORY_WINDOW: Final = TimeWindow(max_age_s=10 * 365 * 86400.0, max_future_s=120)
"""Old documents stay verifiable in a replay: a compacted topic keeps the newest per scope,
however old it is."""


@dataclass(frozen=True)
class HistoryEntry:
    """One record of the config topic and what a worker of the scope made of it."""

    offset: int
    key: str
    outcome: Outcome


@dataclass(frozen=True)
class ConfigReplay:
    """The config in effect for a scope after every record, and each record's outcome."""

    current: ConfigDocument
    entries: tuple[HistoryEntry, ...]
    highest: int
    """The highest valid version seen for any scope (a new document must be newer)."""

    @property
    def next_version(self) -> int:
        return self.highest + 1


def replay(records: Iterable[tuple[int, bytes | None, bytes | None]], scope: str,
           registry: Registry | None) -> ConfigReplay:
    """Offer ``(offset, key, value)`` records in topic order to a fresh applier of ``scope``."""
    applier = ConfigApplier(scope, registry, window=HISTORY_WINDOW)
    entries = []
    highest = 0
    for offset, key, value in records:
        outcome = applier.offer(value, key)
        if outcome.status == "ignored" and outcome.version:
            highest = max(highest, outcome.version)
        entries.append(HistoryEntry(offset, (key or b"").decode("utf-8", "replace"), outcome))
    return ConfigReplay(applier.current, tuple(entries), max(highest, applier.current.version))


def read_config_records(bootstrap: str, topic: str,
                        timeout: float = 30.0) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every record now on the (compacted, one-partition) config topic, creating it if absent."""
    from streams.topics import COMPACTED, TopicSpec, ensure_topics, read_topic

    ensure_topics(bootstrap, [TopicSpec(topic, 1, COMPACTED)], timeout)
    return list(read_topic(bootstrap, topic, timeout=timeout))
