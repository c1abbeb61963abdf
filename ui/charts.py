"""The numbers behind the charts page, as plain data frames (tested without a browser).

>>> from fraud.schema import Decision, Label
>>> from ui.store import DecisionRow
>>> rows = [DecisionRow(Decision(f"t{i}", "a", 0.9 if i % 2 else 0.1,
...                              "hold" if i % 2 else "allow", timings={"decided": i}), "c", i)
...         for i in range(4)]
>>> labels = [Label("t1", True, "analyst", 5), Label("t2", True, "chargeback", 6)]
>>> pr = rolling_precision_recall(rows, labels, window=10)
>>> list(pr["precision"]), list(pr["recall"])
([1.0, 1.0], [1.0, 0.5])
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

import numpy as np
import pandas as pd

from fl.client import read_global_unverified_round
from fraud.schema import Label
from ui.store import DecisionRow, TopicRecord

FLAGGED: Final = frozenset(("verify", "hold", "block"))
"""Actions that count as "flagged as fraud" for precision and recall."""


def _bucket_s(span_s: float) -> int:
    """A bucket size that gives roughly 60 points over the span."""
    for size in (1, 5, 10, 30, 60, 300, 900, 3600):
        if span_s / size <= 90:
            return size
    return 3600


def _times(ts: Sequence[float], size: int) -> list[datetime]:
    return [datetime.fromtimestamp(t - t % size, UTC) for t in ts]


def decisions_over_time(rows: Sequence[DecisionRow]) -> pd.DataFrame:
    """Decisions per action per time bucket (columns time, action, decisions)."""
    if not rows:
        return pd.DataFrame(columns=["time", "action", "decisions"])
    ts = [r.decided_at for r in rows]
    size = _bucket_s(max(ts) - min(ts))
    frame = pd.DataFrame({"time": _times(ts, size), "action": [r.decision.action for r in rows]})
    return frame.groupby(["time", "action"]).size().reset_index(name="decisions")


def latency_percentiles(rows: Sequence[DecisionRow]) -> pd.DataFrame:
    """p50/p95/p99 commit -> decision latency in ms per time bucket (long form)."""
    points = [(r.decided_at, r.latency_s) for r in rows if r.latency_s is not None]
    if not points:
        return pd.DataFrame(columns=["time", "percentile", "ms"])
    size = _bucket_s(max(t for t, _ in points) - min(t for t, _ in points))
    frame = pd.DataFrame({"time": _times([t for t, _ in points], size),
                          "ms": [s * 1000.0 for _, s in points]})
    out = []
    for q, name in ((50, "p50"), (95, "p95"), (99, "p99")):
        g = frame.groupby("time")["ms"].quantile(q / 100).reset_index()
        g["percentile"] = name
        out.append(g)
    return pd.concat(out, ignore_index=True)


def fraud_rate(labels: Sequence[Label]) -> pd.DataFrame:
    """Share of labels that say fraud, per time bucket (columns time, rate, labels)."""
    if not labels:
        return pd.DataFrame(columns=["time", "rate", "labels"])
    ts = [lb.labelled_at for lb in labels]
    size = _bucket_s(max(ts) - min(ts))
    frame = pd.DataFrame({"time": _times(ts, size),
                          "fraud": [float(lb.is_fraud) for lb in labels]})
    g = frame.groupby("time")["fraud"].agg(["mean", "size"]).reset_index()
    return g.rename(columns={"mean": "rate", "size": "labels"})


def rolling_precision_recall(rows: Sequence[DecisionRow], labels: Sequence[Label],
                             window: int = 200) -> pd.DataFrame:
    """Precision and recall of "flagged" over the last ``window`` labelled decisions, at each
    labelled decision in decision order (columns time, precision, recall)."""
    truth = {lb.tx_id: lb.is_fraud for lb in labels}
    joined = sorted((r.decided_at, r.decision.action in FLAGGED, truth[r.decision.tx_id])
                    for r in rows if r.decision.tx_id in truth)
    if not joined:
        return pd.DataFrame(columns=["time", "precision", "recall"])
    flagged = np.array([f for _, f, _ in joined], dtype=float)
    fraud = np.array([y for _, _, y in joined], dtype=float)

    def rolling(x: np.ndarray) -> np.ndarray:
        c = np.concatenate(([0.0], np.cumsum(x)))
        idx = np.arange(1, len(x) + 1)
        return c[idx] - c[np.maximum(idx - window, 0)]

    tp, pos, true = rolling(flagged * fraud), rolling(flagged), rolling(fraud)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pos > 0, tp / np.maximum(pos, 1), np.nan)
        recall = np.where(true > 0, tp / np.maximum(true, 1), np.nan)
    return pd.DataFrame({"time": [datetime.fromtimestamp(t, UTC) for t, _, _ in joined],
                         "precision": precision, "recall": recall})


def federated_rounds(records: Sequence[TopicRecord]) -> pd.DataFrame:
    """``time, round, contributors, version, strategy`` of each global model published on
    ``qsfraud.fl.global`` (signed documents, read here without verifying the signature: the
    workers verify before they fold a model in; this only shows what was published).
    Records that are not a signed global model are left out."""
    rounds = []
    for rec in records:
        if not rec.value:
            continue
        try:
            doc = read_global_unverified_round(rec.value)
            round_ = int(doc["round"])
            contributors = doc.get("contributors") or []
        except Exception:  # anything unreadable is just not a round to show
            continue
        rounds.append({"time": datetime.fromtimestamp(rec.timestamp, UTC), "round": round_,
                       "contributors": len(contributors) if isinstance(contributors, list)
                       else 0,
                       "version": str(doc.get("version", "-")),
                       "strategy": str(doc.get("strategy", "-"))})
    return pd.DataFrame(rounds, columns=["time", "round", "contributors", "version", "strategy"])
