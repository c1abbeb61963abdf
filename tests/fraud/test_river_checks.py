"""The default model is a River classifier: River's own estimator checks, a pipeline, and
River's prequential evaluation."""

from __future__ import annotations

import pytest
from river import checks, compose, datasets, evaluate, linear_model, metrics, preprocessing

from fraud.models import RiskModel


@pytest.mark.parametrize("params", list(RiskModel._unit_test_params()),
                         ids=lambda p: ",".join(p) or "defaults")
def test_passes_rivers_estimator_checks(params: dict[str, object]) -> None:
    checks.check_estimator(RiskModel(**params))  # type: ignore[arg-type]


def test_runs_in_a_pipeline_under_progressive_validation() -> None:
    """On River's bundled Phishing data, prequentially: as good as River's own
    ``StandardScaler | LogisticRegression`` within a margin, in a pipeline of River parts."""
    ours = compose.Pipeline(preprocessing.StandardScaler(), RiskModel())
    river = compose.Pipeline(preprocessing.StandardScaler(), linear_model.LogisticRegression())
    got = evaluate.progressive_val_score(datasets.Phishing(), ours, metrics.ROCAUC())
    baseline = evaluate.progressive_val_score(datasets.Phishing(), river, metrics.ROCAUC())
    assert got.get() > 0.9
    assert got.get() > baseline.get() - 0.03
    assert isinstance(ours["RiskModel"], RiskModel) and ours["RiskModel"].n == 1250


def test_progressive_validation_learns_nothing_while_predicting() -> None:
    """``progressive_val_score`` calls ``predict_proba_one`` then ``learn_one``: the anomaly
    statistics stay empty (they learn only in the explicit unsupervised step)."""
    model = RiskModel()
    evaluate.progressive_val_score(datasets.Phishing().take(200), model, metrics.LogLoss())
    assert model.n == 200 and model.anomaly_seen == 0 and not model.anomaly.stats
