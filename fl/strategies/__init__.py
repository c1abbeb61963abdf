"""Federated aggregation strategies: pure, over named numeric vectors (see fl/README.md)."""

from fl.strategies.base import (
    Aggregate,
    ConfigurationError,
    Instructions,
    Strategy,
    SumAggregation,
)
from fl.strategies.clipping import ClippedUpdates, clip_delta
from fl.strategies.dp import DifferentialPrivacy, RDPAccountant
from fl.strategies.fedavg import FedAvg
from fl.strategies.robust import FedMedian, FedTrimmedAvg
from fl.strategies.secagg import (
    FixedPoint,
    KEMAgreement,
    KeyAgreement,
    MaskedRound,
    MaskedUpdate,
    SecAggParticipant,
    SecureAggregation,
    X25519Agreement,
)

__all__ = [
    "Aggregate",
    "ClippedUpdates",
    "ConfigurationError",
    "DifferentialPrivacy",
    "FedAvg",
    "FedMedian",
    "FedTrimmedAvg",
    "FixedPoint",
    "Instructions",
    "KEMAgreement",
    "KeyAgreement",
    "MaskedRound",
    "MaskedUpdate",
    "RDPAccountant",
    "SecAggParticipant",
    "SecureAggregation",
    "Strategy",
    "SumAggregation",
    "X25519Agreement",
    "clip_delta",
]
