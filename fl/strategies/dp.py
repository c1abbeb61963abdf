"""Central differential privacy: clip, average, add Gaussian noise, and count the budget spent.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
with its fixed-denominator estimator): each participant's delta from the global parameters is
clipped to L2 norm ``C``, the clipped deltas are summed and divided by a *fixed* number ``m`` of
expected participants (not by how many came: a data-dependent denominator would let one
participant move the result by up to ``2C / m``), and Gaussian noise of standard deviation
``z * C / m`` is added (``z`` = ``noise_multiplier``). Adding or removing one participant moves
the sum by at most ``C``, so each round is a Gaussian mechanism of noise multiplier ``z`` with
respect to one participant's whole contribution (participant-level DP). The aggregator is trusted
to add the noise (central DP). No amplification by subsampling is claimed: every round is
counted in full, including rounds where nobody learned (they are noised too: skipping them would
reveal that nobody did). What the noise does not cover: the number of contributors, which the
aggregator knows and publishes.

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
from fl.strategies.clipping import clip_delta
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
    """DP-FedAvg around ``FedAvg(weighted=False)``: clip, sum, divide by ``participants``, noise.

    ``inner`` must be ``FedAvg(weighted=False)``: the noise is calibrated to one participant's
    bounded share of an equal-weight mean, which example-weighted or robust aggregation does not
    have. ``participants`` is the fixed denominator m (the number expected each round); when fewer
    come, the step is shrunk in proportion, never the privacy. With ``clip_on="server"`` the
    wrapper clips each update itself; with ``clip_on="client"`` participants are told to clip
    (``config()["clip_norm"]``) and the wrapper only sums and adds noise: the form that runs under
    secure aggregation, where the aggregator cannot see (or check) an update.

    The noise comes from ``rng``; metrics report the epsilon spent so far at ``target_delta``.
    """

    def __init__(
        self,
        inner: Strategy,
        noise_multiplier: float,
        clip_norm: float,
        participants: int,
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
        if not clip_norm > 0.0 or not math.isfinite(clip_norm):
            raise ValueError(f"clip_norm must be a positive number, got {clip_norm}")
        if participants < 1:
            raise ValueError(f"participants must be >= 1, got {participants}")
        if not 0.0 < target_delta < 1.0:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
        self.inner = inner
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.participants = participants
        self.target_delta = target_delta
        self.clip_on = clip_on
        self.rng = rng if rng is not None else np.random.default_rng()
        self.accountant = RDPAccountant()
        # a server-side clipper must see every update
        self.needs_individual_updates = clip_on == "server"

    @property
    def name(self) -> str:
        return (
            f"DifferentialPrivacy({self.inner.name}, z={self.noise_multiplier}, "
            f"C={self.clip_norm}, m={self.participants}, clip_on={self.clip_on})"
        )

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise added to every coordinate."""
        return self.noise_multiplier * self.clip_norm / self.participants

    def config(self, round: int) -> Config:
        config = dict(self.inner.config(round))
        if self.clip_on == "client":
            config["clip_norm"] = self.clip_norm
        return config

    def weight(self, update: ModelUpdate) -> float:
        return self.inner.weight(update)

    def aggregate(self, round: int, current: Vectors, updates: Sequence[ModelUpdate]) -> Aggregate:
        if self.clip_on == "server":
            updates = [
                ModelUpdate(
                    u.participant,
                    u.round,
                    u.examples,
                    clip_delta(u.vectors, current, self.clip_norm)[0],
                )
                for u in checked_round(round, current, updates)
            ]
        return super().aggregate(round, current, updates)

    def aggregate_sum(
        self,
        round: int,
        current: Vectors,
        weighted_sum: Vectors,
        total_weight: float,
        participants: int,
    ) -> Aggregate:
        # weighted_sum holds the sum of the contributors' (clipped) parameters, each weight 1
        parameters = {
            name: current[name]
            + (weighted_sum[name] - total_weight * current[name]) / self.participants
            + self.rng.normal(0.0, self.noise_std, size=current[name].shape)
            for name in current
        }
        self.accountant.spend(self.noise_multiplier)
        metrics = {
            "participants": participants,
            "noise_std": self.noise_std,
            "epsilon": self.accountant.epsilon(self.target_delta),
            "delta": self.target_delta,
            "dp_rounds": self.accountant.rounds,
        }
        return Aggregate(parameters, metrics)
