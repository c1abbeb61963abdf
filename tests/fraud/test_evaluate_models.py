"""``qsfraud evaluate --model``: the same prequential protocol with a River model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsfraud.cli import main


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "d.csv"
    assert main(["generate", "--retailers", "2", "--days", "3", "--tx-per-day", "100",
                 "--fraud-scale", "10", "--seed", "5", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("model", [
    "river-linear",
    '[{"class": "tree.HoeffdingAdaptiveTreeClassifier", "params": {"seed": 1}}]',
    '[{"class": "preprocessing.MinMaxScaler"}, {"class": "anomaly.HalfSpaceTrees",'
    ' "params": {"seed": 1}}]',
])
def test_evaluate_runs_a_river_model(table: Path, model: str, capsys) -> None:
    assert main(["evaluate", "--data", str(table), "--mode", "all", "--json",
                 "--model", model]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # fl/ federates River's linear pipeline (fl.client.fold_in_river), no other River model
    federated = {"federated"} if model == "river-linear" else set()
    assert set(result) == {"local", "central", *federated}
    for mode in result.values():
        assert mode["overall"]["n"] == 639 and mode["overall"]["roc_auc"] is not None


def test_a_bad_model_is_a_clear_error(table: Path, capsys) -> None:
    assert main(["evaluate", "--data", str(table), "--model", '[{"class": "os.system"}]']) == 2
    assert main(["evaluate", "--data", str(table), "--model", "forest"]) == 2
    err = capsys.readouterr().err
    assert "not an allowed River class" in err and "JSON spec" in err and "Traceback" not in err
