"""Update-norm clipping: bound how far one participant can move the global model.

:class:`ClippedUpdates` scales each participant's *delta* from the current global parameters
(all its vectors together, one L2 norm) down to at most ``clip_norm`` before the inner strategy
aggregates. It reads each update, so it runs on the aggregator without secure aggregation; under
secure aggregation participants must clip their own delta with :func:`clip_delta` before masking
(the aggregator cannot check it).

>>> import numpy as np
>>> from fl.strategies.fedavg import FedAvg
>>> from fl.update import ModelUpdate
>>> current = {"w": np.array([1.0, 1.0])}
>>> big = ModelUpdate("a", 1, 5, {"w": [4.0, 5.0]})  # delta (3, 4), norm 5
>>> ClippedUpdates(FedAvg(), clip_norm=1.0).aggregate(1, current, [big]).parameters
{'w': array([1.6, 1.8])}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fl.strategies.base import (
    Aggregate,
    Config,
    ConfigurationError,
    Instructions,
    Strategy,
    checked_round,
)
from fl.update import ModelUpdate, Vectors


def l2_norm(vectors: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all ``vectors`` taken as one vector."""
    return math.sqrt(math.fsum(float(np.dot(v, v)) for v in vectors.values()))


def clip_delta(
    parameters: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray], clip_norm: float
) -> tuple[Vectors, bool]:
    """``current + delta * min(1, clip_norm / |delta|)`` where ``delta = parameters - current``.

    Returns the clipped parameters and whether clipping changed them.

    >>> clip_delta({"w": np.array([3.0, 4.0])}, {"w": np.zeros(2)}, 2.5)
    ({'w': array([1.5, 2. ])}, True)
    """
    delta = {name: parameters[name] - current[name] for name in current}
    norm = l2_norm(delta)
    if norm <= clip_norm:
        return {name: np.array(parameters[name], dtype=np.float64) for name in current}, False
    scale = clip_norm / norm
    return {name: current[name] + delta[name] * scale for name in current}, True


class ClippedUpdates(Strategy):
    """Clips each participant's delta to ``clip_norm`` (L2), then lets ``inner`` aggregate."""

    def __init__(self, inner: Strategy, clip_norm: float) -> None:
        if not clip_norm > 0.0 or not math.isfinite(clip_norm):
            raise ValueError(f"clip_norm must be a positive number, got {clip_norm}")
        if not inner.receives_plain_updates:
            raise ConfigurationError(
                f"{inner.name} never shows the aggregator an update to clip: under secure "
                f"aggregation participants clip their own delta (clip_delta)"
            )
        self.inner = inner
        self.clip_norm = clip_norm

    @property
    def name(self) -> str:
        return f"ClippedUpdates({self.inner.name}, clip_norm={self.clip_norm})"

    def config(self, round: int) -> Config:
        return self.inner.config(round)

    def configure(
        self, round: int, parameters: Vectors, participants: Sequence[str]
    ) -> dict[str, Instructions]:
        return self.inner.configure(round, parameters, participants)

    def aggregate(self, round: int, current: Vectors, updates: Sequence[ModelUpdate]) -> Aggregate:
        clipped: list[ModelUpdate] = []
        count = 0
        for update in checked_round(round, current, updates):
            vectors, changed = clip_delta(update.vectors, current, self.clip_norm)
            count += changed
            clipped.append(ModelUpdate(update.participant, update.round, update.examples, vectors))
        result = self.inner.aggregate(round, current, clipped)
        return Aggregate(result.parameters, {**result.metrics, "clipped": count})
