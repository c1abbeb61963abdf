"""Coordinate-wise robust aggregation: FedMedian and FedTrimmedAvg.

Both take, for every coordinate on its own, a statistic that a minority of arbitrary
(poisoned) values cannot drag far: the median (Yin et al. 2018), or the mean after cutting the
``beta`` fraction of largest and smallest values. They ignore the example counts (a weight is
one more thing an attacker could inflate) but skip participants that learned nothing this round.
They need every update on its own, so they cannot run under secure aggregation.

>>> import numpy as np
>>> from fl.update import ModelUpdate
>>> current = {"w": np.zeros(1)}
>>> updates = [ModelUpdate(p, 1, 10, {"w": [x]}) for p, x in
...            [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0), ("evil", 1e6)]]
>>> FedMedian().aggregate(1, current, updates).parameters
{'w': array([3.])}
>>> FedTrimmedAvg(beta=0.2).aggregate(1, current, updates).parameters
{'w': array([3.])}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fl.strategies.base import Aggregate, Strategy, checked_round, copy_vectors
from fl.update import ModelUpdate, Vectors


def _stacked(current: Vectors, updates: Sequence[ModelUpdate]) -> dict[str, np.ndarray] | None:
    """Each vector of the learning participants as rows of one matrix; None if none learned."""
    learning = [u for u in updates if u.examples > 0]
    if not learning:
        return None
    return {name: np.stack([u.vectors[name] for u in learning]) for name in current}


class FedMedian(Strategy):
    """The coordinate-wise median of the participants' parameters."""

    def aggregate(self, round: int, current: Vectors, updates: Sequence[ModelUpdate]) -> Aggregate:
        ordered = checked_round(round, current, updates)
        rows = _stacked(current, ordered)
        if rows is None:
            return Aggregate(copy_vectors(current), {"participants": len(ordered)})
        parameters = {name: np.median(m, axis=0) for name, m in rows.items()}
        return Aggregate(parameters, {"participants": len(ordered)})


class FedTrimmedAvg(Strategy):
    """The coordinate-wise mean after dropping the ``beta`` fraction at each end.

    With m learning participants, ``floor(beta * m)`` values are cut at each end, so up to that
    many poisoned participants cannot move the result outside the honest values' range.
    """

    def __init__(self, beta: float = 0.2) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    @property
    def name(self) -> str:
        return f"FedTrimmedAvg(beta={self.beta})"

    def aggregate(self, round: int, current: Vectors, updates: Sequence[ModelUpdate]) -> Aggregate:
        ordered = checked_round(round, current, updates)
        rows = _stacked(current, ordered)
        if rows is None:
            return Aggregate(copy_vectors(current), {"participants": len(ordered)})
        m = len(next(iter(rows.values()))) if rows else 0
        cut = math.floor(self.beta * m)
        parameters = {
            name: np.mean(np.sort(matrix, axis=0)[cut : m - cut], axis=0)
            for name, matrix in rows.items()
        }
        return Aggregate(parameters, {"participants": len(ordered), "trimmed_each_end": cut})
