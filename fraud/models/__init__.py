"""Online models: the default :class:`RiskModel` and its plain-data, mergeable parts."""

from fraud.models.linear import empty_linear, merge_linear
from fraud.models.risk import ModelParams, RiskModel, empty_state, merge_states
from fraud.models.scaler import RunningScaler, merge_scalers

__all__ = [
    "ModelParams",
    "RiskModel",
    "RunningScaler",
    "empty_linear",
    "empty_state",
    "merge_linear",
    "merge_scalers",
    "merge_states",
]
