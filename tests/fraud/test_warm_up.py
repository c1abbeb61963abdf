"""``RiskModel.warm_up`` loads every compiled loop the model's own calls use, so a worker's
first batch does not wait for numba (about a second on the 2-core machines)."""

from __future__ import annotations

import json
import subprocess
import sys

# Run in a fresh interpreter: in the test session other tests have called the loops already.
_SCRIPT = """
import json
from itertools import chain

import numpy as np
from numba.core.registry import CPUDispatcher

from fraud.features import FEATURE_NAMES
from fraud.models import RiskModel, kernels


def signatures():
    return {name: len(f.signatures) for name, f in vars(kernels).items()
            if isinstance(f, CPUDispatcher)}


RiskModel.warm_up()
warm = signatures()
model = RiskModel(head_window=50)
rng = np.random.default_rng(1)
names = tuple(FEATURE_NAMES)
for _ in range(3):  # as the worker scores a batch (streams.scoring) and learns its labels
    vectors = rng.normal(size=(4, len(names))).tolist()
    matrix = np.fromiter(chain.from_iterable(vectors), dtype=np.float64,
                         count=len(vectors) * len(names)).reshape(len(vectors), len(names))
    model.score_and_explain_many(names, matrix, 3, observe=True)
    for i, row in enumerate(vectors):
        x = dict(zip(names, row))
        model.learn_one(x, i % 2 == 0)
        model.score_and_explain(x)
        model.score_one(x)
        model.contributions(x)
        model.score_then_learn_one(x, False)
print(json.dumps({"warm": warm, "after": signatures()}))
"""


def test_warm_up_loads_every_loop_the_model_calls() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the public loops were all loaded, and using the model loaded nothing more
    assert all(result["warm"][name] for name in
               ("score_rows", "score_matrix", "learn_rows", "head_evidence", "top_positive"))
    assert result["after"] == result["warm"]
