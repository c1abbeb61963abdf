"""Shared helpers for the UI tests: the app under AppTest, records on real Kafka."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from streamlit.testing.v1 import AppTest

from fraud.schema import Decision, Transaction
from fraud.topics import RetailerTopics
from streams.topics import TopicSpec, ensure_topics

APP = Path(__file__).resolve().parents[2] / "ui" / "app.py"
PAGES = ("views/feed.py", "views/review.py", "views/charts.py", "views/admin.py")


@pytest.fixture
def ui_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """A clean UI environment (no admin key, no workers); stops the app's threads after."""
    from ui import runtime

    for name in ("QSFRAUD_BOOTSTRAP", "QSFRAUD_UI_RETAILERS", "QSFRAUD_WORKER_METRICS",
                 "QSFRAUD_ADMIN_KEYS", "QSFRAUD_CONFIG_TRUST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QSFRAUD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QSFRAUD_CONFIG_TRUST", str(tmp_path / "no-registry.json"))
    yield monkeypatch
    runtime.stop_all()


def app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=30)


def run_until(at: AppTest, done: Callable[[AppTest], bool], timeout: float = 20.0,
              page: str | None = None) -> AppTest:
    """Rerun the app (the background reader fills the store meanwhile) until ``done``."""
    deadline = time.monotonic() + timeout
    while True:
        if page is not None:
            at.switch_page(page)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if done(at):
            return at
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; markdown: {[m.value for m in at.markdown]}, "
                                 f"info: {[i.value for i in at.info]}")
        time.sleep(0.3)


def texts(at: AppTest) -> str:
    """Every text the page shows (markdown, captions, alerts, metrics, titles), joined."""
    parts: list[str] = []
    for kind in ("title", "subheader", "markdown", "caption", "info", "error", "warning",
                 "success"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [f"{m.label}: {m.value}" for m in at.metric]
    return "\n".join(parts)


def decision(tx_id: str, retailer: str, score: float, action: str, decided: float,
             reasons: tuple[str, ...] = ("score>=hold", "amount_log +1.20")) -> Decision:
    return Decision(tx_id=tx_id, retailer_id=retailer, score=score, action=action,
                    reasons=reasons, model_version="local+1", config_version=0,
                    timings={"committed": decided - 0.012, "received": decided - 0.004,
                             "decided": decided})


def produce_decisions(bootstrap: str, retailer: str,
                      rows: list[tuple[Decision, str, float]]) -> None:
    """``(decision, customer_id, amount)``: the decision and its transaction, as the workers
    and the CDC write them."""
    t = RetailerTopics(retailer)
    ensure_topics(bootstrap, [TopicSpec(t.decisions, 2, {}), TopicSpec(t.transactions, 2, {}),
                              TopicSpec(t.labels, 2, {})])
    producer = Producer({"bootstrap.servers": bootstrap})
    for d, customer, amount in rows:
        tx = Transaction(tx_id=d.tx_id, retailer_id=retailer, occurred_at=d.timings["decided"],
                         amount=amount, customer_id=customer, payment_instrument="pi_1",
                         device_id="dev-9", channel="web")
        envelope: dict[str, Any] = {"v": 1, "op": "c", "committed_at": d.timings["committed"],
                                    "tx": tx.to_dict()}
        import json

        producer.produce(t.transactions, key=customer.encode(),
                         value=json.dumps(envelope).encode())
        producer.produce(t.decisions, key=customer.encode(), value=d.to_json())
    assert producer.flush(30) == 0
