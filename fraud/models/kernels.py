"""Compiled per-event loops of :class:`~fraud.models.risk.RiskModel` (numba, no Python objects).

The model keeps its per-feature statistics as rows of float64 arrays: the scaler table
``S[row] = [count, mean, m2, 1/std, weight, raw weight, is raw]`` (two linear heads on one
scaler: every feature, and the raw-input family alone) and the anomaly table
``A[row] = [count, mean, m2, 1/std]``. A vector arrives as its values plus, per value, the row
of its feature in each table (``-1``: the table has no record for it). A row whose count is 0
was just allocated for a feature the table has not seen: the loop creates its record there.

The loops are the model's arithmetic written out element by element in the order of the
vector, so every result is bit-identical to the plain-Python model they replace
(``tests/fraud/test_fast_paths.py``); ``fastmath`` stays off for that reason. Compiled code is
cached next to this file (``cache=True``), so a process after the first pays no compile time.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

FloatArray = Any  # numpy float64 arrays; numba functions are untyped for mypy


@njit(cache=True, nogil=True)
def score_rows(S: FloatArray, A: FloatArray, srows: Any, arows: Any, values: FloatArray,
               clip: float, intercept: float, observe: bool, contributions: FloatArray,
               wcol: int) -> tuple[float, float]:  # pragma: no cover - compiled
    """``(dot, zz)``: the linear score of the head whose weights are column ``wcol`` of ``S``
    and the sum of clipped squared anomaly z-scores.

    With ``observe`` the anomaly statistics learn the values (new records start at the value).
    ``contributions[i]`` receives ``weight * z`` of value ``i`` (NaN without a scaler record)
    when it is as long as ``values``; pass an empty array to skip that.
    """
    nclip = -clip
    c2 = clip * clip
    explain = contributions.shape[0] == values.shape[0]
    dot = intercept
    zz = 0.0
    for i in range(values.shape[0]):
        v = values[i]
        r = srows[i]
        if r >= 0:
            z = (v - S[r, 1]) * S[r, 3]
            if z > clip:
                z = clip
            elif z < nclip:
                z = nclip
            c = S[r, wcol] * z
            dot += c
            if explain:
                contributions[i] = c
        elif explain:
            contributions[i] = np.nan
        a = arows[i]
        if a < 0:
            continue
        n = A[a, 0]
        if n == 0.0:  # a row allocated for a new record
            if observe:
                A[a, 0] = 1.0
                A[a, 1] = v
                A[a, 2] = 0.0
                A[a, 3] = 0.0
            continue
        mean = A[a, 1]
        d = v - mean
        z = d * A[a, 3]
        z *= z
        zz += z if z < c2 else c2
        if observe:
            n += 1.0
            mean += d / n
            m2 = A[a, 2] + d * (v - mean)
            A[a, 0] = n
            A[a, 1] = mean
            A[a, 2] = m2
            var = m2 / n  # 0 also when a tiny m2 underflows: no division by zero
            A[a, 3] = 1.0 / math.sqrt(var) if var > 0.0 else 0.0
    return dot, zz


@njit(cache=True, nogil=True)
def learn_rows(S: FloatArray, srows: Any, values: FloatArray, clip: float, intercept: float,
               raw_intercept: float, positive: bool, pos_weight: float, learning_rate: float,
               decay: float, window: FloatArray, window_labels: Any,
               slot: int) -> tuple[float, float]:  # pragma: no cover - compiled
    """One SGD step of both heads: update the scaler rows, then the weights; returns each
    head's intercept step.

    With ``slot >= 0``, ``window[:, slot]`` receives each head's linear score of ``values`` as
    the model stood before this step (the score it would have given them) and
    ``window_labels[slot]`` the label. The raw head (column 5) moves only on rows flagged raw
    (column 6); elsewhere its weight stays 0. A new record (count 0) starts at the value and
    takes no step, like a feature the model has never seen.
    """
    nclip = -clip
    k = values.shape[0]
    zs = np.empty(k)
    seen = np.zeros(k, dtype=np.bool_)
    before = intercept
    raw_before = raw_intercept
    dot = intercept
    raw_dot = raw_intercept
    for i in range(k):
        v = values[i]
        r = srows[i]
        n = S[r, 0]
        if n == 0.0:
            S[r, 0] = 1.0
            S[r, 1] = v
            S[r, 2] = 0.0
            S[r, 3] = 0.0
            S[r, 4] = 0.0
            S[r, 5] = 0.0
            continue
        mean = S[r, 1]
        d = v - mean
        z = d * S[r, 3]
        if z > clip:
            z = clip
        elif z < nclip:
            z = nclip
        before += S[r, 4] * z
        raw_before += S[r, 5] * z
        n += 1.0
        mean += d / n
        m2 = S[r, 2] + d * (v - mean)
        var = m2 / n
        inv = 1.0 / math.sqrt(var) if var > 0.0 else 0.0
        S[r, 0] = n
        S[r, 1] = mean
        S[r, 2] = m2
        S[r, 3] = inv
        z = (v - mean) * inv
        if z > clip:
            z = clip
        elif z < nclip:
            z = nclip
        zs[i] = z
        seen[i] = True
        dot += S[r, 4] * z
        raw_dot += S[r, 5] * z
    step = learning_rate * _gradient(dot, positive, pos_weight)
    raw_step = learning_rate * _gradient(raw_dot, positive, pos_weight)
    for i in range(k):
        if seen[i]:
            r = srows[i]
            S[r, 4] = S[r, 4] * decay - step * zs[i]  # w * 1.0 is exactly w: no l2, no change
            if S[r, 6] != 0.0:
                S[r, 5] = S[r, 5] * decay - raw_step * zs[i]
    if slot >= 0:
        window[0, slot] = before
        window[1, slot] = raw_before
        window_labels[slot] = positive
    return step, raw_step


@njit(cache=True, nogil=True)
def _gradient(dot: float, positive: bool, pos_weight: float) -> float:  # pragma: no cover
    """The log loss's gradient at ``dot`` (clipped to [-35, 35]), positives weighted."""
    if dot < -35.0:
        dot = -35.0
    elif dot > 35.0:
        dot = 35.0
    p = 1.0 / (1.0 + math.exp(-dot))
    return (p - 1.0) * pos_weight if positive else p


@njit(cache=True, nogil=True)
def _per_positive(scores: FloatArray, labels: Any,
                  positives: int) -> tuple[Any, Any]:  # pragma: no cover - compiled
    """``(rank losses, precisions)`` of each positive (in index order): the share of
    negatives scored above it (ties half), and the precision at its threshold (every score at
    least its own, ties included), whose mean is the average precision
    (:func:`fraud.metrics.average_precision`). One sort of all scores and one of the
    positives' serve both."""
    n = labels.shape[0]
    negatives = n - positives
    ranked = np.sort(scores)
    pos = np.empty(positives)
    p = 0
    for i in range(n):
        if labels[i]:
            pos[p] = scores[i]
            p += 1
    pos_ranked = np.sort(pos)
    losses = np.empty(positives)
    precisions = np.empty(positives)
    for q in range(positives):
        s = pos[q]
        below = np.searchsorted(ranked, s, side="left")
        at_most = np.searchsorted(ranked, s, side="right")
        pos_below = np.searchsorted(pos_ranked, s, side="left")
        pos_at_most = np.searchsorted(pos_ranked, s, side="right")
        above = (n - at_most) - (positives - pos_at_most)
        ties = (at_most - below) - (pos_at_most - pos_below)
        losses[q] = (above + 0.5 * ties) / negatives
        precisions[q] = (positives - pos_below) / (n - below)
    return losses, precisions


@njit(cache=True, nogil=True)
def _z(d: FloatArray) -> float:  # pragma: no cover - compiled
    """The mean of ``d`` over its standard error (sample standard deviation / sqrt(n))."""
    n = d.shape[0]
    mean = 0.0
    for i in range(n):
        mean += d[i]
    mean /= n
    ss = 0.0
    for i in range(n):
        ss += (d[i] - mean) * (d[i] - mean)
    se = math.sqrt(ss / (n - 1)) / math.sqrt(n)
    return mean / (se if se > 1e-12 else 1e-12)


@njit(cache=True, nogil=True)
def head_evidence(full: FloatArray, raw: FloatArray, labels: Any
                  ) -> tuple[float, float]:  # pragma: no cover - compiled
    """``(rank z, precision z)``: how many standard errors the full head's scores beat the
    raw head's on these labels, paired per positive: in the share of negatives ranked above
    it (lower is better) and in the precision at its threshold (the terms of average
    precision). ``(0, 0)`` with fewer than two positives or no negative."""
    n = labels.shape[0]
    positives = 0
    for i in range(n):
        if labels[i]:
            positives += 1
    negatives = n - positives
    if positives < 2 or negatives == 0:
        return 0.0, 0.0
    full_losses, full_precisions = _per_positive(full, labels, positives)
    raw_losses, raw_precisions = _per_positive(raw, labels, positives)
    return _z(raw_losses - full_losses), _z(full_precisions - raw_precisions)


@njit(cache=True, nogil=True)
def top_positive(terms: FloatArray, ranks: Any, k: int) -> Any:  # pragma: no cover - compiled
    """Indices of the ``k`` largest positive ``terms``, largest first, padded with -1; equal
    terms are ordered by ``ranks`` (each feature name's place in sorted order)."""
    chosen = np.full(k, -1, dtype=np.int64)
    values = np.empty(k)
    size = 0
    for i in range(terms.shape[0]):
        c = terms[i]
        if not c > 0.0:
            continue
        r = ranks[i]
        if size == k and not (c > values[k - 1] or (c == values[k - 1]
                                                   and r < ranks[chosen[k - 1]])):
            continue
        j = size if size < k else k - 1  # when full, the last kept one goes
        while j > 0 and (c > values[j - 1] or (c == values[j - 1]
                                               and r < ranks[chosen[j - 1]])):
            chosen[j] = chosen[j - 1]
            values[j] = values[j - 1]
            j -= 1
        chosen[j] = i
        values[j] = c
        if size < k:
            size += 1
    return chosen


@njit(cache=True, nogil=True)
def score_matrix(S: FloatArray, A: FloatArray, srows: Any, arows: Any, X: FloatArray,
                 clip: float, intercept: float, observe: bool, ranks: Any,
                 k: int, wcol: int) -> tuple[Any, Any, Any, Any]:  # pragma: no cover - compiled
    """:func:`score_rows` and, with ``k``, :func:`top_positive` for each row of ``X`` in
    order (one call for a batch): ``(dots, zzs, chosen, chosen_terms)``, where row ``j`` of
    ``chosen`` holds the indices of its ``k`` largest positive terms (padded with -1) and
    ``chosen_terms`` those terms."""
    n = X.shape[0]
    dots = np.empty(n)
    zzs = np.empty(n)
    chosen = np.full((n, k), -1, dtype=np.int64)
    chosen_terms = np.zeros((n, k))
    terms = np.empty(X.shape[1] if k > 0 else 0)
    for j in range(n):
        dot, zz = score_rows(S, A, srows, arows, X[j], clip, intercept, observe, terms,
                             wcol)
        dots[j] = dot
        zzs[j] = zz
        if k > 0:
            top = top_positive(terms, ranks, k)
            for m in range(k):
                i = top[m]
                chosen[j, m] = i
                if i >= 0:
                    chosen_terms[j, m] = terms[i]
    return dots, zzs, chosen, chosen_terms
