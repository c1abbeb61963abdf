"""Freshness stores: in memory, persisted across restarts, and pluggable."""

from __future__ import annotations

import os
import threading

import pytest

from pqc import envelope
from pqc.errors import FreshnessStateError, Replay
from pqc.freshness import FileFreshness, InMemoryFreshness

NOW = 1_750_000_000.0


def test_in_memory_is_atomic_under_threads():
    store = InMemoryFreshness()
    accepted = []

    def worker():
        for seq in range(200):
            try:
                store.advance("r", "p", seq)
                accepted.append(seq)
            except Replay:
                pass

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(accepted) == sorted(set(accepted))  # never the same sequence twice
    assert store.last_sequence("r", "p") == 199


def test_file_store_survives_a_restart(tmp_path, parties):
    path = tmp_path / "state" / "freshness.json"
    agg = parties.aggregator
    recipient = parties.retailer.registry.current_kem_key("aggregator")
    blob = envelope.seal(b"u", parties.retailer.identity, recipient, "model-update", 3, now=NOW)
    envelope.open(blob, agg.kem, agg.registry, freshness=FileFreshness(path), now=NOW)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(Replay):  # a "restarted worker" still knows sequence 3
        envelope.open(blob, agg.kem, agg.registry, freshness=FileFreshness(path), now=NOW)


def test_file_store_refuses_a_corrupt_file(tmp_path):
    path = tmp_path / "f.json"
    path.write_text('{"format": "qsfraud-freshness", "version": 1, "last": [{"sender": 1}]}')
    with pytest.raises(FreshnessStateError):
        FileFreshness(path)
    path.write_text("[]")
    with pytest.raises(FreshnessStateError):
        FileFreshness(path)


def test_a_custom_store_plugs_in(parties):
    class Recording:
        def __init__(self):
            self.calls = []

        def last_sequence(self, sender, purpose):
            return None

        def advance(self, sender, purpose, sequence):
            self.calls.append((sender, purpose, sequence))

    store = Recording()
    agg = parties.aggregator
    recipient = parties.retailer.registry.current_kem_key("aggregator")
    blob = envelope.seal(b"u", parties.retailer.identity, recipient, "model-update", 8, now=NOW)
    envelope.open(blob, agg.kem, agg.registry, freshness=store, now=NOW)
    assert store.calls == [("retailer-1", "model-update", 8)]
