"""The strategy interface: configure a round, aggregate its results (after Flower's Strategy).

A strategy is pure: no I/O, no clock, no Kafka. The aggregator process asks it what to send
participants (:meth:`Strategy.configure`) and, when the round closes, what the new global
parameters are (:meth:`Strategy.aggregate`). Wrappers for cross-cutting concerns (clipping,
differential privacy, secure aggregation) take another strategy.

Some strategies need only the weighted *sum* of the updates (:class:`SumAggregation`): those
alone can run under secure aggregation, where the aggregator never sees one update.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fl.update import ModelUpdate, UpdateFormatError, Vectors, check_layout, layout_of

# Settings a round sends participants: plain JSON scalars.
Config = dict[str, float | int | str | bool]


class ConfigurationError(ValueError):
    """A combination of strategies that cannot work (for example secure + robust)."""


@dataclass(frozen=True)
class Instructions:
    """What one participant is told at the start of a round."""

    round: int
    parameters: Vectors = field(repr=False)
    config: Config = field(default_factory=dict)


@dataclass(frozen=True)
class Aggregate:
    """A round's outcome: the new global parameters and what the strategy measured."""

    parameters: Vectors = field(repr=False)
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy(ABC):
    """Decides what participants are told and how their updates become the global model."""

    #: True when :meth:`aggregate` needs each update on its own (robust statistics,
    #: server-side clipping): such a strategy cannot run under secure aggregation.
    needs_individual_updates: bool = True
    #: False when :meth:`aggregate` cannot take plain updates (secure aggregation): nothing
    #: that reads updates (a clipping wrapper) can sit on top of it.
    receives_plain_updates: bool = True

    @property
    def name(self) -> str:
        """A short description (published with the global model)."""
        return type(self).__name__

    def config(self, round: int) -> Config:
        """Settings participants must apply this round (none by default)."""
        return {}

    def configure(
        self, round: int, parameters: Vectors, participants: Sequence[str]
    ) -> dict[str, Instructions]:
        """The instructions for each participant of ``round`` (the same for all by default)."""
        instructions = Instructions(round, parameters, self.config(round))
        return {participant: instructions for participant in participants}

    @abstractmethod
    def aggregate(self, round: int, current: Vectors, updates: Sequence[ModelUpdate]) -> Aggregate:
        """The new global parameters from ``current`` and this round's ``updates``."""


class SumAggregation(Strategy):
    """A strategy whose result depends only on sums: it can run under secure aggregation.

    Each participant contributes ``weight * parameters`` and ``weight`` (:meth:`weight`); the
    aggregator learns only the two sums and calls :meth:`aggregate_sum`.
    """

    needs_individual_updates = False

    @abstractmethod
    def weight(self, update: ModelUpdate) -> float:
        """How much ``update`` counts in the sum (participant-side under secure aggregation)."""

    @abstractmethod
    def aggregate_sum(
        self,
        round: int,
        current: Vectors,
        weighted_sum: Vectors,
        total_weight: float,
        participants: int,
    ) -> Aggregate:
        """The new global parameters from the sum of ``weight * parameters`` over participants."""

    def aggregate(self, round: int, current: Vectors, updates: Sequence[ModelUpdate]) -> Aggregate:
        ordered = checked_round(round, current, updates)
        total = 0.0
        weighted: Vectors = {name: np.zeros_like(v) for name, v in current.items()}
        for update in ordered:
            w = self.weight(update)
            if w == 0.0:
                continue
            total += w
            for name, values in update.vectors.items():
                weighted[name] += w * values
        return self.aggregate_sum(round, current, weighted, total, len(ordered))


def checked_round(
    round: int, current: Mapping[str, np.ndarray], updates: Sequence[ModelUpdate]
) -> list[ModelUpdate]:
    """``updates`` sorted by participant (so results do not depend on arrival order).

    Refuses an update of another round, a second update from one participant and vectors whose
    names or lengths differ from ``current``.
    """
    expected = layout_of(current)
    seen: set[str] = set()
    for update in updates:
        if update.round != round:
            raise UpdateFormatError(
                "round", f"{update.participant} sent round {update.round}, this is round {round}"
            )
        if update.participant in seen:
            raise UpdateFormatError("participant", f"two updates from {update.participant}")
        seen.add(update.participant)
        check_layout(update.vectors, expected, f"{update.participant}.vectors")
    return sorted(updates, key=lambda u: u.participant)


def copy_vectors(vectors: Mapping[str, np.ndarray]) -> Vectors:
    """An independent copy (results never alias the caller's arrays)."""
    return {name: np.array(values, dtype=np.float64) for name, values in vectors.items()}
