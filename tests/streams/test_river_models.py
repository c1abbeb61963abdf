"""A worker runs the River model its live config names: score, decide, learn, checkpoint,
restore (the scoring pipeline without Kafka)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fraud.decisions import PolicyConfig
from fraud.models import RiskModel, RiverModel
from fraud.schema import SchemaError
from streams.checkpoints import checkpoint_value, model_from_checkpoints
from streams.config_stream import ConfigDocument
from streams.scoring import InputRecord, ScoringPipeline

LINEAR = [{"class": "preprocessing.StandardScaler"},
          {"class": "linear_model.LogisticRegression",
           "params": {"optimizer": {"class": "optim.SGD", "params": {"lr": 0.05}}}}]
FOREST = [{"class": "forest.ARFClassifier", "params": {"n_models": 3, "seed": 2}}]


def tx(i: int) -> dict:
    return {"tx_id": f"t{i}", "retailer_id": "acme", "amount": 10.0 + (900.0 if i % 5 == 0 else i),
            "customer_id": f"c{i % 7}", "payment_instrument": f"p{i % 3}", "device_id": "d1",
            "ip": "10.1.1.1", "occurred_at": 1_000.0 + 60 * i}


def record(i: int) -> InputRecord:
    return InputRecord(json.dumps(tx(i)).encode(), b"c1", 0, i, 1_000.0, "acme.transactions")


def label(i: int) -> InputRecord:
    doc = {"tx_id": f"t{i}", "is_fraud": i % 5 == 0, "source": "chargeback", "labelled_at": 9}
    return InputRecord(json.dumps(doc).encode(), b"c1", 0, i, 9.0, "acme.labels")


def _config(spec: list[dict] | None, version: int) -> ConfigDocument:
    return ConfigDocument.default().updated({"river_model": spec}, version=version)


def _restart(pipe: ScoringPipeline, config: ConfigDocument) -> ScoringPipeline:
    value = checkpoint_value("acme", pipe.model, config.version, now=1.0)
    restored = model_from_checkpoints([(0, b"acme", value)], "acme")
    assert restored is not None
    fresh = ScoringPipeline("acme", model=restored)
    fresh.apply_config(config)  # the worker replays its config after restoring
    assert fresh.model is restored
    return fresh


@pytest.mark.parametrize("spec", [LINEAR, FOREST], ids=["linear", "forest"])
def test_a_river_model_from_config_scores_learns_and_survives_a_restart(spec) -> None:
    pipe = ScoringPipeline("acme")
    config = _config(spec, 2)
    pipe.apply_config(config)
    assert isinstance(pipe.model, RiverModel)
    out = pipe.process_batch([record(i) for i in range(60)], now=5.0)
    assert len(out.decisions) == 60
    learned = pipe.learn_batch([label(i) for i in range(60)])
    assert learned.learned == 60 and pipe.model_version == "local+60"
    decided = [json.loads(d.value) for d in pipe.process_batch(
        [record(i) for i in range(60, 70)], now=6.0).decisions]
    if spec is LINEAR:  # a linear model explains itself
        assert any(d["reasons"] for d in decided)
    restarted = _restart(pipe, config)
    names = pipe.names
    X = np.array([pipe.scored.get(f"t{i}")["x"] for i in range(60, 70)])
    assert restarted.model.score_and_explain_many(names, X, 3) == \
        pipe.model.score_and_explain_many(names, X, 3)
    assert restarted.model_version == pipe.model_version


def test_a_config_naming_another_model_swaps_it_between_batches() -> None:
    pipe = ScoringPipeline("acme")
    default = pipe.model
    pipe.apply_config(ConfigDocument.default().updated({"model.l2": 0.5}, version=2))
    assert pipe.model is default and isinstance(default, RiskModel) and default.l2 == 0.5
    pipe.apply_config(_config(LINEAR, 3))
    river = pipe.model
    assert isinstance(river, RiverModel)
    pipe.apply_config(_config(LINEAR, 4))  # the same model: kept, with what it learned
    assert pipe.model is river
    pipe.apply_config(_config(None, 5))
    assert isinstance(pipe.model, RiskModel)


def test_the_policy_validates_the_spec_and_names_the_field() -> None:
    policy = PolicyConfig.from_dict({"river_model": LINEAR})
    assert PolicyConfig.from_dict(policy.to_dict()) == policy
    assert "river_model" not in PolicyConfig.from_dict({}).to_dict()
    with pytest.raises(SchemaError) as err:
        PolicyConfig.from_dict({"river_model": [{"class": "os.system"}]})
    assert err.value.field == "river_model[0].class"
