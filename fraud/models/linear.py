"""Logistic-regression weights as plain data, and their count-weighted merge.

>>> merged = merge_linear([
...     {"weights": {"a": 1.0}, "intercept": 0.0, "n": 3, "n_pos": 1, "n_neg": 2},
...     {"weights": {"a": 3.0, "b": 2.0}, "intercept": 1.0, "n": 1, "n_pos": 0, "n_neg": 1},
... ])
>>> merged["weights"], merged["intercept"], merged["n"], merged["n_pos"]
({'a': 1.5, 'b': 2.0}, 0.25, 4, 1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def empty_linear() -> dict[str, Any]:
    """The state of a model that has learned nothing."""
    return {"weights": {}, "intercept": 0.0, "n": 0, "n_pos": 0, "n_neg": 0}


def merge_linear(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Average weights over the union of feature keys, weighted by each model's sample count.

    A model that never had a feature has no say on it; a model with ``n == 0`` has no say at all
    (merging with an empty model is the identity). Sums are exactly rounded (``math.fsum``), so
    the result does not depend on the order of ``states``.
    """
    live = [s for s in states if int(s["n"]) > 0]
    if not live:
        return empty_linear()
    if len(live) == 1:
        only = live[0]
        return {
            "weights": {k: float(w) for k, w in sorted(only["weights"].items())},
            "intercept": float(only["intercept"]),
            "n": int(only["n"]),
            "n_pos": int(only["n_pos"]),
            "n_neg": int(only["n_neg"]),
        }
    keys = sorted({k for s in live for k in s["weights"]})
    weights: dict[str, float] = {}
    for k in keys:
        parts = [(float(s["n"]), float(s["weights"][k])) for s in live if k in s["weights"]]
        if len(parts) == 1:
            weights[k] = parts[0][1]
        else:
            weights[k] = math.fsum(n * w for n, w in parts) / math.fsum(n for n, _ in parts)
    total = math.fsum(float(s["n"]) for s in live)
    return {
        "weights": weights,
        "intercept": math.fsum(float(s["n"]) * float(s["intercept"]) for s in live) / total,
        "n": sum(int(s["n"]) for s in live),
        "n_pos": sum(int(s["n_pos"]) for s in live),
        "n_neg": sum(int(s["n_neg"]) for s in live),
    }
