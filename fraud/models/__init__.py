"""Online models: the default :class:`RiskModel`, any allow-listed River model
(:class:`RiverModel`, built from a plain-data spec), and their plain-data, mergeable parts."""

from fraud.models.linear import empty_linear, merge_linear
from fraud.models.risk import ModelParams, RiskModel, empty_state, merge_states
from fraud.models.river_model import RiverModel, model_from_config, spec_tuple
from fraud.models.river_spec import ALLOWED, LINEAR_SPEC, build_estimator, check_spec
from fraud.models.river_state import (
    export_linear_pipeline,
    load_linear_pipeline,
    merge_linear_pipelines,
)
from fraud.models.scaler import RunningScaler, merge_scalers, subtract_scaler

__all__ = [
    "ALLOWED",
    "LINEAR_SPEC",
    "ModelParams",
    "RiskModel",
    "RiverModel",
    "RunningScaler",
    "build_estimator",
    "check_spec",
    "empty_linear",
    "empty_state",
    "export_linear_pipeline",
    "load_linear_pipeline",
    "merge_linear",
    "merge_linear_pipelines",
    "merge_scalers",
    "merge_states",
    "model_from_config",
    "spec_tuple",
    "subtract_scaler",
]
