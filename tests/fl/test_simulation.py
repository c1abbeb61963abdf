"""The federated simulation: evaluate's format, strategies, determinism, poisoning."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from fl.simulation import (
    WATCH_KEY,
    AttackCount,
    Poisoner,
    Settings,
    cross_retailer_attack,
    entity_rows,
    honest_change,
    run_federated,
    runner,
    simulate,
    watch_outcome,
)
from fl.watchlist import ReplaySettings, replay
from fraud.evaluation import MODES, Options, Prepared, evaluate, prepare, summarize
from fraud.generator import GeneratorConfig, generate
from fraud.models import ModelParams
from qsfraud.cli import main

OPTIONS = Options(label_delay=7 * 86400.0)


@cache
def generated(retailers: int) -> Prepared:
    rows = list(generate(GeneratorConfig(retailers=retailers, days=4, tx_per_day=150, seed=3,
                                         fraud_scale=3.0)))
    return prepare(rows)


@cache
def five_retailers() -> Prepared:
    """~12,000 rows, ~300 frauds: enough that one swapped rank does not move AP by 0.02 (on
    a quarter of that, honest runs differ by 0.04 from noise alone)."""
    rows = list(generate(GeneratorConfig(retailers=5, days=8, tx_per_day=300, seed=3,
                                         fraud_scale=2.0)))
    return prepare(rows)


def test_federated_mode_reports_like_the_other_modes() -> None:
    data = generated(3)
    result = evaluate(data, ("local", "federated"), options=OPTIONS,
                      runners={**MODES, "federated": runner(Settings(sync_every=100))})
    local, federated = result["local"], result["federated"]
    assert federated["overall"]["n"] == local["overall"]["n"] == len(data)
    assert set(federated["retailers"]) == set(local["retailers"]) == {
        "retailer_1", "retailer_2", "retailer_3"}
    assert set(federated["overall"]) == set(local["overall"])
    assert "federated" not in MODES  # fraud's registry stays fraud's own


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian", "fedtrimmedavg"])
def test_every_strategy_runs_rounds_with_every_retailer(strategy: str) -> None:
    scores, federation = simulate(generated(3), ModelParams(), OPTIONS,
                                  Settings(sync_every=100, strategy=strategy))
    assert federation.strategy.name.lower().startswith(strategy)
    assert len(scores["ours"]) == len(generated(3))
    # ~1,900 rows, a round every 100 rows per retailer: about 6 rounds
    assert len(federation.log) >= 4
    assert any(len(r.contributors) == 3 for r in federation.log)
    assert all(set(r.mixes) == {"retailer_1", "retailer_2", "retailer_3"}
               for r in federation.log)


def test_the_simulation_is_deterministic() -> None:
    settings = Settings(sync_every=100, strategy="fedavg")
    first = run_federated(generated(3), ModelParams(), OPTIONS, settings)
    again = run_federated(generated(3), ModelParams(), OPTIONS, settings)
    assert first == again


def test_unknown_strategy_and_bad_sync_are_refused() -> None:
    with pytest.raises(ValueError, match="fedavg"):
        Settings(strategy="krum")
    with pytest.raises(ValueError, match="sync_every"):
        Settings(sync_every=0)


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_an_update_scaled_by_100_barely_moves_the_honest_retailers(strategy: str) -> None:
    data = five_retailers()  # FedTrimmedAvg(0.2) cuts one value at each end from 5
    honest = summarize(data, run_federated(data, ModelParams(), OPTIONS,
                                           Settings(sync_every=200, strategy=strategy))["ours"])
    poisoned = summarize(data, run_federated(
        data, ModelParams(), OPTIONS,
        Settings(sync_every=200, strategy=strategy,
                 poisoners=(Poisoner("retailer_2", "scale", 100.0),)))["ours"])
    assert honest_change(honest, poisoned, ("retailer_2",)) < 0.02


def test_a_label_flipping_retailer_runs_a_twin_and_the_others_are_scored() -> None:
    data = generated(5)
    scores, federation = simulate(data, ModelParams(), OPTIONS,
                                  Settings(sync_every=100, strategy="fedmedian",
                                           poisoners=(Poisoner("retailer_1", "flip"),)))
    assert len(scores["ours"]) == len(data)
    assert federation.retailers["retailer_1"].twin is not None
    assert federation.retailers["retailer_2"].twin is None


def test_cross_retailer_attack_counts_rows_passed_before_the_first_hold() -> None:
    def row(card: str, retailer: str, scenario: str = "card_cross_retailer") -> dict[str, str]:
        return {"scenario": scenario, "payment_instrument": card, "retailer_id": retailer}

    rows = [row("c1", "A"), row("c1", "A"), row("x", "B", ""), row("c1", "B"), row("c1", "B"),
            row("c1", "B"), row("c1", "C"), row("c2", "B"), row("c2", "C")]
    scores = [0.1, 0.9, 0.99, 0.2, 0.85, 0.1, 0.3, 0.9, 0.5]
    # c1: first at A (not counted); B passes one then holds (the later 0.1 is after the
    # hold); C passes one, never caught. c2: first at B; C passes one, never caught.
    assert cross_retailer_attack(rows, scores) == AttackCount(
        campaigns=2, rows=5, passed=3, never_caught=2)
    with pytest.raises(ValueError):
        cross_retailer_attack(rows, scores[:-1])


def test_the_command_runs_the_federated_mode(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from fraud.generator import write_rows

    path = tmp_path / "gen.csv"
    write_rows(generate(GeneratorConfig(retailers=3, days=2, tx_per_day=100, seed=5)), path)
    assert main(["evaluate", "--data", str(path), "--mode", "federated", "--sync-every", "50",
                 "--strategy", "fedmedian"]) == 0
    out = capsys.readouterr().out
    assert "federated      retailer_3" in out
    assert "local " not in out
    with pytest.raises(SystemExit):
        main(["evaluate", "--data", str(path), "--strategy", "krum"])


def test_entity_rows_follow_the_evaluation_order() -> None:
    rows = [{"tx_id": f"t{i}", "retailer_id": "r", "occurred_at": float(t), "is_fraud": 0,
             "amount": 1.0, "payment_instrument": f"p{t}", "device_id": None if t == 2 else "d"}
            for i, t in enumerate([3, 1, 2])]
    data = prepare(rows)
    assert entity_rows(data) == [{"payment_instrument": "p1", "device_id": "d"},
                                 {"payment_instrument": "p2", "device_id": None},
                                 {"payment_instrument": "p3", "device_id": "d"}]


def test_the_watchlist_catches_the_cross_retailer_attack_no_later(tmp_path: Path) -> None:
    from fraud.evaluation import load, read_table
    from fraud.generator import write_rows

    path = tmp_path / "gen.csv"
    write_rows(generate(GeneratorConfig(retailers=3, days=6, tx_per_day=300, seed=5,
                                        fraud_scale=3.0)), path)
    data, rows = load(path), read_table(path)
    scores = MODES["local"](data, ModelParams(), OPTIONS)["ours"]
    labels = data.labels.tolist()
    hits = replay(data.times.tolist(), data.retailers, entity_rows(data), scores, labels,
                  ReplaySettings(signal="hold"), WATCH_KEY)
    outcome = watch_outcome(scores, hits, labels)
    before, after = cross_retailer_attack(rows, scores), cross_retailer_attack(rows,
                                                                               outcome.scores)
    assert before.campaigns > 0 and outcome.raised_fraud > 0
    assert after.passed < before.passed
    assert all(s >= 0.8 for s, h in zip(outcome.scores, hits, strict=True) if h)


def test_the_attack_command_reports_the_watchlist(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fl.simulation import main as simulation_main
    from fraud.generator import write_rows

    path = tmp_path / "gen.csv"
    write_rows(generate(GeneratorConfig(retailers=3, days=2, tx_per_day=100, seed=5)), path)
    assert simulation_main(["attack", "--data", str(path), "--sync-every", "50",
                            "--watch", "hold", "review"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["mode"], line.get("signal")) for line in lines] == [
        ("local", None), ("local+watchlist", "hold"), ("local+watchlist", "review"),
        ("central", None), ("federated", None), ("federated+watchlist", "hold"),
        ("federated+watchlist", "review")]
    assert all("false_holds" in line for line in lines if "signal" in line)


def test_rivers_linear_pipeline_is_federated_with_the_workers_fold_in() -> None:
    from dataclasses import replace

    from fraud.models import LINEAR_SPEC, RiverModel

    options = replace(OPTIONS, river_model=tuple(LINEAR_SPEC))
    data = generated(3)
    scores, federation = simulate(data, ModelParams(), options, Settings(sync_every=100))
    assert len(scores["ours"]) == len(data)
    assert len(federation.log) >= 3
    assert all(isinstance(m.model, RiverModel) for m in federation.retailers.values())
    assert {len(log.mixes) for log in federation.log[1:]} == {3}
    assert all(m.model.version.startswith("r") for m in federation.retailers.values())
    again = run_federated(data, ModelParams(), options, Settings(sync_every=100))
    assert again["ours"] == scores["ours"]


def test_other_river_models_are_refused() -> None:
    from dataclasses import replace

    from fraud.evaluation import DataError

    tree = ({"class": "tree.HoeffdingTreeClassifier"},)
    with pytest.raises(DataError, match="river-linear"):
        run_federated(generated(3), ModelParams(), replace(OPTIONS, river_model=tree),
                      Settings(sync_every=100))


def test_the_command_federates_river_linear_and_refuses_other_river_specs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fraud.generator import write_rows

    path = tmp_path / "gen.csv"
    write_rows(generate(GeneratorConfig(retailers=3, days=2, tx_per_day=100, seed=5)), path)
    assert main(["evaluate", "--data", str(path), "--mode", "federated", "--sync-every", "50",
                 "--model", "river-linear"]) == 0
    assert "federated      retailer_3" in capsys.readouterr().out
    assert main(["evaluate", "--data", str(path), "--mode", "federated",
                 "--model", '[{"class": "tree.HoeffdingTreeClassifier"}]']) != 0
    assert "river-linear only" in capsys.readouterr().err
