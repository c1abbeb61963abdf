"""Exact metrics agree with scikit-learn, including ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from fraud.metrics import average_precision, precision_at_k, recall_at_fpr, report, roc_auc

labelled = st.lists(
    st.tuples(st.booleans(), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0])
              | st.floats(0, 1)),
    min_size=2, max_size=60,
).filter(lambda rows: 0 < sum(y for y, _ in rows) < len(rows))


@settings(max_examples=200, deadline=None)
@given(labelled)
def test_match_scikit_learn(rows) -> None:
    y = [r[0] for r in rows]
    s = [r[1] for r in rows]
    assert math.isclose(roc_auc(y, s), roc_auc_score(y, s), abs_tol=1e-12)
    assert math.isclose(average_precision(y, s), average_precision_score(y, s), abs_tol=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    for target in (0.0, 0.01, 0.1, 0.5):
        expected = float(np.max(tpr[fpr <= target])) if np.any(fpr <= target) else 0.0
        assert math.isclose(recall_at_fpr(y, s, target), expected, abs_tol=1e-12)


def test_precision_at_k_and_degenerate_inputs() -> None:
    y = [1, 0, 1, 0]
    s = [0.9, 0.8, 0.7, 0.1]
    assert precision_at_k(y, s, 1) == 1.0
    assert precision_at_k(y, s, 2) == 0.5
    assert math.isnan(roc_auc([0, 0], [0.1, 0.2]))
    assert report([0, 0], [0.1, 0.2])["roc_auc"] is None
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.1])
