"""Central differential privacy: clip, average, add Gaussian noise, and count the budget spent.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
each participant's delta is clipped to L2 norm ``C``, the m deltas are averaged with equal
weights, and Gaussian noise of standard deviation ``z * C / m`` is added to the average
(``z`` = ``noise_multiplier``). One participant changes the average by at most ``C / m``, so each
round is a Gaussian mechanism of noise multiplier ``z`` with respect to one participant's data.
The guarantee is participant-level and assumes the aggregator adds the noise honestly (central
DP). No amplification by subsampling is claimed: every round is counted in full.

:class:`RDPAccountant` reports the (epsilon, delta) spent so far. Renyi DP of the Gaussian
mechanism with noise multiplier z (Mironov 2017, "Renyi Differential Privacy", Prop. 7):
``eps_RDP(alpha) = alpha / (2 z^2)``; k rounds compose additively (Prop. 1):
``eps_RDP(alpha) = sum_i alpha / (2 z_i^2)``. Conversion to (eps, delta)-DP (Prop. 3):
``eps = eps_RDP(alpha) + log(1/delta) / (alpha - 1)``, minimised over alpha > 1; for the
Gaussian's linear curve ``a * alpha`` the minimum is at ``alpha = 1 + sqrt(log(1/delta) / a)``:
``eps = a + 2 * sqrt(a * log(1/delta))``.

>>> accountant = RDPAccountant()
>>> accountant.spend(noise_multiplier=1.0)
>>> round(accountant.epsilon(delta=1e-5), 4)
5.2985
>>> for _ in range(9):
...     accountant.spend(noise_multiplier=1.0)
>>> round(accountant.epsilon(delta=1e-5), 3)  # 10 rounds: 5 + 2 * sqrt(5 * log(1e5))
20.174
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fl.strategies.base import (
    Aggregate,
    Config,
    ConfigurationError,
    Strategy,
    SumAggregation,
    checked_round,
)
from fl.strategies.clipping import ClippedUpdates
from fl.strategies.fedavg import FedAvg
from fl.update import ModelUpdate, Vectors


class RDPAccountant:
    """The privacy budget of a sequence of Gaussian mechanisms, through Renyi DP."""

    def __init__(self) -> None:
        # the composed RDP curve is rdp_slope * alpha (every term is linear in alpha)
        self.rdp_slope = 0.0
        self.rounds = 0

    def spend(self, noise_multiplier: float) -> None:
        """Counts one Gaussian mechanism with noise std = ``noise_multiplier`` x sensitivity."""
        if not noise_multiplier > 0.0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        self.rdp_slope += 1.0 / (2.0 * noise_multiplier**2)
        self.rounds += 1

    def rdp(self, alpha: float) -> float:
        """The Renyi DP epsilon of order ``alpha`` spent so far."""
        return self.rdp_slope * alpha

    def epsilon(self, delta: float) -> float:
        """The smallest epsilon of (epsilon, delta)-DP that Mironov's conversion proves."""
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if self.rdp_slope == 0.0:
            return 0.0
        log_inv_delta = math.log(1.0 / delta)
        return self.rdp_slope + 2.0 * math.sqrt(self.rdp_slope * log_inv_delta)

    def best_alpha(self, delta: float) -> float:
        """The Renyi order at which :meth:`epsilon` is reached."""
        return 1.0 + math.sqrt(math.log(1.0 / delta) / self.rdp_slope)


class DifferentialPrivacy(SumAggregation):
    """Clips each delta to ``clip_norm``, averages with equal weights and adds Gaussian noise.

    ``inner`` must be ``FedAvg(weighted=False)``: the noise is calibrated to one participant's
    share of an equal-weight mean (``C / m``), which example-weighted or robust aggregation does
    not have. With ``clip_on="server"`` the wrapper clips each update itself; with
    ``clip_on="client"`` participants are told to clip (``config()["clip_norm"]``) and the
    wrapper only adds the noise: the form that runs under secure aggregation, where the
    aggregator cannot see (or check) an update.

    The noise comes from ``rng``; metrics report the epsilon spent so far at ``target_delta``.
    """

    def __init__(
        self,
        inner: Strategy,
        noise_multiplier: float,
        clip_norm: float,
        target_delta: float = 1e-5,
        clip_on: str = "server",
        rng: np.random.Generator | None = None,
    ) -> None:
        if not (isinstance(inner, FedAvg) and not inner.weighted):
            raise ConfigurationError(
                f"differential privacy needs an equal-weight mean (FedAvg(weighted=False)) "
                f"under it, got {inner.name}: its noise std z*C/m assumes each participant "
                f"moves the mean by at most C/m"
            )
        if clip_on not in ("server", "client"):
            raise ConfigurationError(f"clip_on must be 'server' or 'client', got {clip_on!r}")
        if not noise_multiplier > 0.0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if not 0.0 < target_delta < 1.0:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
        self.inner = inner
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.target_delta = target_delta
        self.clip_on = clip_on
        self.clipping = ClippedUpdates(inner, clip_norm)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.accountant = RDPAccountant()
        # a server-side clipper must see every update
        self.needs_individual_updates = clip_on == "server"

    @property
    def name(self) -> str:
        return (
            f"DifferentialPrivacy({self.inner.name}, z={self.noise_multiplier}, "
            f"C={self.clip_norm}, clip_on={self.clip_on})"
        )

    def config(self, round: int) -> Config:
        config = dict(self.inner.config(round))
        if self.clip_on == "client":
            config["clip_norm"] = self.clip_norm
        return config

    def weight(self, update: ModelUpdate) -> float:
        return self.inner.weight(update)

    def aggregate(self, round: int, current: Vectors, updates: Sequence[ModelUpdate]) -> Aggregate:
        if self.clip_on == "client":
            return super().aggregate(round, current, updates)
        ordered = checked_round(round, current, updates)
        clipped = self.clipping.aggregate(round, current, ordered)
        learning = sum(1 for u in ordered if self.inner.weight(u) > 0.0)
        return self._noised(current, clipped, learning)

    def aggregate_sum(
        self,
        round: int,
        current: Vectors,
        weighted_sum: Vectors,
        total_weight: float,
        participants: int,
    ) -> Aggregate:
        mean = self.inner.aggregate_sum(round, current, weighted_sum, total_weight, participants)
        return self._noised(current, mean, int(round_half(total_weight)))

    def _noised(self, current: Vectors, mean: Aggregate, learning: int) -> Aggregate:
        if learning == 0:  # nothing released: the current parameters, no budget spent
            return Aggregate(mean.parameters, {**mean.metrics, **self._budget()})
        std = self.noise_multiplier * self.clip_norm / learning
        noised = {
            name: values + self.rng.normal(0.0, std, size=values.shape)
            for name, values in mean.parameters.items()
        }
        self.accountant.spend(self.noise_multiplier)
        return Aggregate(noised, {**mean.metrics, "noise_std": std, **self._budget()})

    def _budget(self) -> dict[str, float]:
        return {
            "epsilon": self.accountant.epsilon(self.target_delta),
            "delta": self.target_delta,
            "dp_rounds": self.accountant.rounds,
        }


def round_half(x: float) -> float:
    """``x`` rounded to the nearest integer (an equal-weight total counts participants)."""
    return math.floor(x + 0.5)
