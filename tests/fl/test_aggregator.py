"""The aggregator on real Kafka: rounds with 3 retailers, every refusal, kill -9, two leaders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer

from fl.client import GlobalModel, fold_in, open_global, seal_update, update_from_model
from fl.update import ModelUpdate
from fraud.models.risk import RiskModel
from pqc.envelope import seal
from pqc.freshness import InMemoryFreshness
from streams.topics import read_topic
from tests.fl.conftest import Federation

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Topics:
    updates: str
    globals: str
    group: str


@pytest.fixture
def topics(unique_name: str) -> Topics:
    return Topics(f"{unique_name}.updates", f"{unique_name}.global", f"{unique_name}-agg")


class AggregatorProcess:
    def __init__(self, bootstrap: str, federation: Federation, topics: Topics, log: Path,
                 *extra: str) -> None:
        self.log = log
        args = [sys.executable, "-m", "qsfraud", "aggregator",
                "--keys", str(federation.aggregator.path), "--bootstrap", bootstrap,
                "--updates-topic", topics.updates, "--global-topic", topics.globals,
                "--group-id", topics.group, "--transactional-id", topics.group,
                "--session-timeout-ms", "6000", "--metrics-interval", "1", *extra]
        self.stderr = log.open("ab")
        self.process = subprocess.Popen(args, cwd=ROOT, stderr=self.stderr,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_for(self, test: Callable[[list[dict]], bool], timeout: float = 40.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if test(self.events()):
                return
            if self.process.poll() is not None:
                raise AssertionError(f"aggregator exited {self.process.returncode}: "
                                     f"{self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out; log: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stderr.close()


@pytest.fixture
def start(kafka_bootstrap: str, federation: Federation, topics: Topics,
          tmp_path: Path) -> Iterator[Callable[..., AggregatorProcess]]:
    started: list[AggregatorProcess] = []

    def _start(*extra: str, log: str = "aggregator.log") -> AggregatorProcess:
        process = AggregatorProcess(kafka_bootstrap, federation, topics, tmp_path / log, *extra)
        started.append(process)
        return process

    yield _start
    for process in started:
        process.stop()


class Retailer:
    """A simulated retailer: a RiskModel, its key store and a sequence counter."""

    def __init__(self, index: int, federation: Federation) -> None:
        self.keys = federation.retailers[index]
        self.name = self.keys.identity.name
        self.federation = federation
        self.model = RiskModel()
        self.rng = np.random.default_rng(index)
        self.sequence = 0
        self.freshness = InMemoryFreshness()
        self.last_round: int | None = None
        self.recent: list[tuple[dict[str, float], bool]] = []

    def learn(self, n: int = 40) -> None:
        for _ in range(n):
            y = bool(self.rng.random() < 0.2)
            x = {"amount": float(self.rng.normal(2.0 if y else 0.0, 1.0)),
                 f"shop_{self.name}": float(self.rng.random())}
            self.model.learn_one(x, y)
            self.recent = [*self.recent[-99:], (x, y)]

    def sealed(self, round_: int) -> bytes:
        self.sequence += 1
        update = update_from_model(self.model, self.name, round_)
        return seal_update(update, self.keys.identity, self.federation.aggregator_kem,
                           self.sequence)

    def apply(self, blob: bytes) -> GlobalModel:
        glob = open_global(blob, self.keys.registry, self.freshness, last_round=self.last_round)
        fold_in(self.model, glob, self.recent)
        self.last_round = glob.round
        return glob


def send(bootstrap: str, topic: str, *blobs: bytes) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for blob in blobs:
        producer.produce(topic, value=blob)
    assert producer.flush(30) == 0


def globals_on(bootstrap: str, topic: str, at_least: int = 0, timeout: float = 30.0) -> list[bytes]:
    """The records on the global topic, waiting for ``at_least`` (a commit's markers reach the
    partition a moment after the producer's commit returns)."""
    end = time.monotonic() + timeout
    while True:
        blobs = [value for _, _, value in read_topic(bootstrap, topic) if value]
        if len(blobs) >= at_least or time.monotonic() > end:
            return blobs
        time.sleep(0.2)


def opened_globals(bootstrap: str, topic: str, federation: Federation,
                   at_least: int = 0) -> list[GlobalModel]:
    """Every global model on ``topic``, each verified as a retailer would."""
    fresh = InMemoryFreshness()
    registry = federation.retailers[0].registry
    return [open_global(blob, registry, fresh)
            for blob in globals_on(bootstrap, topic, at_least)]


def published(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("event") == "published"]


def test_three_retailers_complete_three_rounds(
    kafka_bootstrap: str, federation: Federation, topics: Topics, start: Callable[..., Any]
) -> None:
    agg = start("--quorum", "3", "--deadline", "30")
    retailers = [Retailer(i, federation) for i in range(3)]
    for round_ in (1, 2, 3):
        for retailer in retailers:
            retailer.learn()
        send(kafka_bootstrap, topics.updates, *(r.sealed(round_) for r in retailers))
        agg.wait_for(lambda ev, n=round_: len(published(ev)) >= n)
        blob = globals_on(kafka_bootstrap, topics.globals, round_)[-1]
        for retailer in retailers:
            glob = retailer.apply(blob)
            assert glob.round == round_
            assert glob.contributors == ("retailer-0", "retailer-1", "retailer-2")
            assert glob.examples == 120  # each round counts only that round's labels
    rounds = opened_globals(kafka_bootstrap, topics.globals, federation, 3)
    assert [g.round for g in rounds] == [1, 2, 3]
    assert [g.parent_version for g in rounds] == [None, rounds[0].version, rounds[1].version]
    assert all(r.model.version == rounds[-1].version for r in retailers)


def test_every_refusal_is_counted_with_its_reason(
    kafka_bootstrap: str, federation: Federation, topics: Topics, start: Callable[..., Any]
) -> None:
    agg = start("--quorum", "3", "--deadline", "60", "--max-update-bytes", "20000")
    r0, r1, r2 = (Retailer(i, federation) for i in range(3))
    for r in (r0, r1, r2):
        r.learn()
    good0 = r0.sealed(1)
    tampered = bytearray(r1.sealed(1))
    tampered[-200] ^= 1
    kem = federation.aggregator_kem
    nan_payload = json.dumps({"v": 1, "participant": "retailer-1", "round": 1, "examples": 1,
                              "vectors": {"intercept": [float("nan")]}}).encode()
    r1.sequence += 1
    not_finite = seal(nan_payload, r1.keys.identity, kem, "fl.update", r1.sequence)
    r1.sequence += 1
    infinite = seal(nan_payload.replace(b"NaN", b"-Infinity"), r1.keys.identity, kem,
                    "fl.update", r1.sequence)
    admin = seal_update(ModelUpdate("admin-1", 1, 1, {"intercept": [0.0]}),
                        federation.admin.identity, kem, 1)
    outsider = seal_update(ModelUpdate("retailer-x", 1, 1, {"intercept": [0.0]}),
                           federation.outsider.identity, kem, 1)
    send(kafka_bootstrap, topics.updates,
         b"x" * 30_000,  # oversized
         outsider, admin, bytes(tampered), not_finite, infinite,
         good0, good0,  # the second is a replay
         r0.sealed(1),  # duplicate: a new sequence number, the same round
         r1.sealed(7),  # future round
         r1.sealed(1), r2.sealed(1))  # quorum: round 1 closes
    agg.wait_for(lambda ev: len(published(ev)) == 1)
    send(kafka_bootstrap, topics.updates, r2.sealed(1), r2.sealed(0))  # late, stale
    expected = {"oversized": 1, "unknown_sender": 1, "unauthorized": 1, "tampered": 1,
                "not_finite": 2, "replayed": 1, "duplicate": 1, "future_round": 1, "late": 1,
                "stale_round": 1}

    def all_counted(events: list[dict]) -> bool:
        metrics = [e for e in events if e.get("metric") == "aggregator"]
        return bool(metrics) and metrics[-1]["refused"] == expected

    agg.wait_for(all_counted)
    reasons = [e["reason"] for e in agg.events() if e.get("event") == "refused"]
    assert sorted(reasons) == sorted(r for r, n in expected.items() for _ in range(n))
    assert published(agg.events())[0]["contributors"] == ["retailer-0", "retailer-1",
                                                           "retailer-2"]


def test_kill_9_mid_round_then_restart_publishes_the_round_once(
    kafka_bootstrap: str, federation: Federation, topics: Topics, start: Callable[..., Any],
    tmp_path: Path,
) -> None:
    freshness = str(tmp_path / "freshness.json")
    agg = start("--quorum", "3", "--deadline", "60", "--freshness", freshness)
    retailers = [Retailer(i, federation) for i in range(3)]
    for r in retailers:
        r.learn()
    send(kafka_bootstrap, topics.updates, retailers[0].sealed(1), retailers[1].sealed(1))
    agg.wait_for(lambda ev: sum(e.get("event") == "accepted" for e in ev) == 2)
    agg.process.kill()
    agg.process.wait()
    again = start("--quorum", "3", "--deadline", "60", "--freshness", freshness,
                  log="restarted.log")
    send(kafka_bootstrap, topics.updates, retailers[2].sealed(1))
    again.wait_for(lambda ev: len(published(ev)) == 1)
    for r in retailers:
        r.learn()
    send(kafka_bootstrap, topics.updates, *(r.sealed(2) for r in retailers))
    again.wait_for(lambda ev: len(published(ev)) == 2)
    time.sleep(1.0)  # a second publication of round 1 or 2 would be visible by now
    models = opened_globals(kafka_bootstrap, topics.globals, federation, 2)
    assert [g.round for g in models] == [1, 2]
    assert models[0].contributors == ("retailer-0", "retailer-1", "retailer-2")
    assert not [e for e in again.events() if e.get("event") == "refused"]


def leads(events: list[dict]) -> bool:
    """Whether the process holds the updates partition now (its last leader/revoked event)."""
    changes = [e["event"] for e in events if e.get("event") in ("leader", "revoked")]
    return bool(changes) and changes[-1] == "leader"


def test_two_aggregators_publish_each_round_once(
    kafka_bootstrap: str, federation: Federation, topics: Topics, start: Callable[..., Any]
) -> None:
    """Two processes in one group: one leads. When the leader stops answering mid-round
    (SIGSTOP: a zombie, not dead) the other takes the round over; resumed, the zombie
    publishes nothing; every round is published once."""
    pair = [start("--quorum", "3", "--deadline", "60", log=f"agg{i}.log") for i in range(2)]
    end = time.monotonic() + 40
    while sum(leads(p.events()) for p in pair) != 1 or not all(
        any(e.get("event") == "started" for e in p.events()) for p in pair
    ):
        assert time.monotonic() < end, "no single leader"
        time.sleep(0.3)
    retailers = [Retailer(i, federation) for i in range(3)]
    for r in retailers:
        r.learn()
    send(kafka_bootstrap, topics.updates, *(r.sealed(1) for r in retailers))
    assert [g.round for g in opened_globals(kafka_bootstrap, topics.globals, federation, 1)] \
        == [1]
    for r in retailers:
        r.learn()
    send(kafka_bootstrap, topics.updates, retailers[0].sealed(2), retailers[1].sealed(2))
    end = time.monotonic() + 40
    while True:  # wait until the (maybe new) leader holds two updates of round 2
        leader = next((p for p in pair if leads(p.events())), None)
        if leader is not None and sum(e.get("event") == "accepted" and e["round"] == 2
                                      for e in leader.events()) == 2:
            break
        assert time.monotonic() < end, "round 2 never reached its leader"
        time.sleep(0.2)
    other = pair[1] if leader is pair[0] else pair[0]
    leader.process.send_signal(signal.SIGSTOP)
    try:
        other.wait_for(lambda ev: leads(ev) and any(
            e.get("event") == "leader" and e["round"] == 2 for e in ev))
        send(kafka_bootstrap, topics.updates, retailers[2].sealed(2))
        other.wait_for(lambda ev: any(e.get("event") == "published" and e["round"] == 2
                                      for e in ev))
    finally:
        leader.process.send_signal(signal.SIGCONT)
    time.sleep(3.0)  # the resumed zombie gets its chance to publish round 2 again
    models = opened_globals(kafka_bootstrap, topics.globals, federation, 2)
    assert [g.round for g in models] == [1, 2]
    assert models[1].contributors == ("retailer-0", "retailer-1", "retailer-2")
    assert sorted(e["round"] for p in pair for e in published(p.events())) == [1, 2]
    for r in retailers:
        r.learn()
    send(kafka_bootstrap, topics.updates, *(r.sealed(3) for r in retailers))
    models = opened_globals(kafka_bootstrap, topics.globals, federation, 3)
    assert [g.round for g in models] == [1, 2, 3]
