"""FedAvg: the mean of the participants' parameters, weighted by what each learned this round.

McMahan et al. 2017. A participant that learned nothing this round (0 examples) contributes
nothing; a round where nobody learned anything keeps the current global parameters.

>>> import numpy as np
>>> from fl.update import ModelUpdate
>>> current = {"w": np.array([0.0, 0.0])}
>>> updates = [ModelUpdate("a", 1, 30, {"w": [1.0, 2.0]}),
...            ModelUpdate("b", 1, 10, {"w": [5.0, 6.0]}),
...            ModelUpdate("c", 1, 0, {"w": [99.0, 99.0]})]
>>> FedAvg().aggregate(1, current, updates).parameters
{'w': array([2., 3.])}
>>> FedAvg(weighted=False).aggregate(1, current, updates[:2]).parameters
{'w': array([3., 4.])}
"""

from __future__ import annotations

from fl.strategies.base import Aggregate, SumAggregation, copy_vectors
from fl.update import ModelUpdate, Vectors


class FedAvg(SumAggregation):
    """Weighted (by examples learned this round) or plain mean of the participants' parameters.

    ``weighted=False`` gives every participant that learned something the same weight: the form
    differential privacy needs (its noise is calibrated to one participant's share, 1/m).
    """

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    @property
    def name(self) -> str:
        return "FedAvg" if self.weighted else "FedAvg(unweighted)"

    def weight(self, update: ModelUpdate) -> float:
        if update.examples == 0:
            return 0.0
        return float(update.examples) if self.weighted else 1.0

    def aggregate_sum(
        self,
        round: int,
        current: Vectors,
        weighted_sum: Vectors,
        total_weight: float,
        participants: int,
    ) -> Aggregate:
        if total_weight <= 0.0:
            return Aggregate(copy_vectors(current), {"participants": participants, "weight": 0.0})
        parameters = {name: values / total_weight for name, values in weighted_sum.items()}
        return Aggregate(parameters, {"participants": participants, "weight": total_weight})
