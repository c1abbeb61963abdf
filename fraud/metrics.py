"""Exact ranking metrics for fraud scores (not River's approximate streaming ROCAUC).

>>> y = [0, 0, 1, 1, 0, 1]
>>> s = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
>>> round(roc_auc(y, s), 6), round(average_precision(y, s), 6)
(0.888889, 0.916667)
>>> precision_at_k(y, s, 2), round(recall_at_fpr(y, s, 0.34), 6)
(1.0, 1.0)
>>> report(y, s)["n"], report(y, s)["frauds"]
(6, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

Labels: TypeAlias = Sequence[Any] | npt.NDArray[Any]
Scores: TypeAlias = Sequence[float] | npt.NDArray[Any]


def _arrays(y_true: Labels, scores: Scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"need two 1-d sequences of equal length, got {y.shape} and {s.shape}")
    return y, s


def roc_auc(y_true: Labels, scores: Scores) -> float:
    """Exact area under the ROC curve (ties count one half); NaN without both classes."""
    y, s = _arrays(y_true, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=float)
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct threshold, high to low."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    distinct = np.where(np.diff(s_sorted))[0]
    ends = np.r_[distinct, y_sorted.size - 1]
    tps = np.cumsum(y_sorted)[ends]
    fps = ends + 1 - tps
    return tps.astype(float), fps.astype(float)


def average_precision(y_true: Labels, scores: Scores) -> float:
    """Average precision as scikit-learn computes it (step-wise, no interpolation)."""
    y, s = _arrays(y_true, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    tps, fps = _curve(y, s)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def precision_at_k(y_true: Labels, scores: Scores, k: int) -> float:
    """Share of frauds among the ``k`` highest scores (ties broken by position)."""
    y, s = _arrays(y_true, scores)
    if k <= 0 or y.size == 0:
        return math.nan
    top = np.argsort(-s, kind="mergesort")[:k]
    return float(y[top].mean())


def recall_at_fpr(y_true: Labels, scores: Scores, max_fpr: float = 0.01) -> float:
    """Highest recall reachable by a threshold whose false-positive rate is <= ``max_fpr``."""
    y, s = _arrays(y_true, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    tps, fps = _curve(y, s)
    ok = fps / n_neg <= max_fpr
    return float(tps[ok].max() / n_pos) if ok.any() else 0.0


def report(y_true: Labels, scores: Scores, k: int = 100,
           max_fpr: float = 0.01) -> dict[str, float]:
    """``roc_auc``, ``average_precision``, ``precision_at_k``, ``recall_at_fpr``, ``n``, ``frauds``.

    Undefined metrics (a single class) are ``None`` so the result is valid JSON.
    """
    y, s = _arrays(y_true, scores)
    out: dict[str, Any] = {
        "roc_auc": roc_auc(y, s),
        "average_precision": average_precision(y, s),
        "precision_at_k": precision_at_k(y, s, k),
        "recall_at_fpr": recall_at_fpr(y, s, max_fpr),
    }
    for key, value in out.items():
        out[key] = None if value is None or math.isnan(value) else round(float(value), 6)
    out["k"] = k
    out["max_fpr"] = max_fpr
    out["n"] = int(y.size)
    out["frauds"] = int(y.sum())
    return out
