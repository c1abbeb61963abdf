"""Generator determinism and scenarios; evaluation on generated and arbitrary tables; CLI."""

from __future__ import annotations

import csv
import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from fraud.evaluation import DataError, evaluate, prepare, read_table
from fraud.generator import COLUMNS, SCENARIOS, GeneratorConfig, generate, write_rows
from fraud.schema import Label, Transaction
from qsfraud.cli import main

SMALL = GeneratorConfig(retailers=3, days=8, tx_per_day=150, seed=3, fraud_scale=8.0)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return list(generate(SMALL))


def test_deterministic_time_ordered_with_every_scenario(rows) -> None:
    assert rows == list(generate(SMALL))
    other = GeneratorConfig(retailers=3, days=8, tx_per_day=150, seed=4, fraud_scale=8.0)
    assert rows != list(generate(other))
    assert all(a["occurred_at"] <= b["occurred_at"] for a, b in pairwise(rows))
    scenarios = Counter(r["scenario"] for r in rows if r["is_fraud"])
    assert set(scenarios) == set(SCENARIOS)
    assert all(r["scenario"] == "" for r in rows if not r["is_fraud"])
    assert len({r["tx_id"] for r in rows}) == len(rows)


def test_customers_shop_at_several_retailers_and_cards_cross_retailers(rows) -> None:
    homes: dict[str, set[str]] = {}
    for r in rows:
        if r["customer_id"].startswith("cust_"):
            homes.setdefault(r["customer_id"], set()).add(r["retailer_id"])
    assert any(len(v) > 1 for v in homes.values())
    cards: dict[str, set[str]] = {}
    for r in rows:
        if r["scenario"] == "card_cross_retailer":
            cards.setdefault(r["payment_instrument"], set()).add(r["retailer_id"])
    assert any(len(v) > 1 for v in cards.values())


def test_labels_are_delayed_realistically(rows) -> None:
    for r in rows:
        delay = r["labelled_at"] - r["occurred_at"]
        if r["is_fraud"] and r["label_source"] == "chargeback":
            assert 5 * 86400 <= delay <= 45 * 86400
        elif r["is_fraud"]:
            assert r["label_source"] == "analyst" and delay <= 3 * 86400
        assert delay > 0


def test_files_are_valid_transactions_and_labels(tmp_path: Path, rows) -> None:
    for name in ("g.csv", "g.jsonl"):
        path = tmp_path / name
        assert write_rows(rows[:300], path) == 300
        table = read_table(path)
        assert list(table[0]) == list(COLUMNS)
        for row in table:
            tx = Transaction.from_dict(row)
            assert tx.extras.keys() == {"is_fraud", "scenario", "label_source", "labelled_at"}
            Label.from_dict({"tx_id": row["tx_id"], "is_fraud": row["is_fraud"],
                             "source": row["label_source"], "labelled_at": row["labelled_at"]})


def test_evaluation_on_generated_data_beats_chance(rows) -> None:
    data = prepare(rows)
    assert data.plan.label == "is_fraud" and data.plan.time == "occurred_at"
    assert {"scenario", "label_source", "labelled_at"} <= set(data.plan.ignored)
    result = evaluate(data)
    for mode in ("local", "central"):
        overall = result[mode]["overall"]
        assert overall["n"] == len(rows) and overall["frauds"] == sum(r["is_fraud"] for r in rows)
        assert overall["roc_auc"] > 0.85
        assert set(result[mode]["retailers"]) == {"retailer_1", "retailer_2", "retailer_3"}


def test_generic_table_with_messy_columns(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["TransactionID", "Time", "V1", "colour", "city", "const", "note", "Class"])
        for i in range(600):
            fraud = i % 20 == 7
            w.writerow([1000 + i, i * 3, "" if i % 50 == 0 else (5.0 if fraud else i % 3),
                        "red" if fraud else ("blue" if i % 2 else "green"), f"city{i % 40}",
                        "x", f"free text {i}", "1" if fraud else "0"])
    data = prepare(read_table(path))
    plan = data.plan
    assert (plan.label, plan.time) == ("Class", "Time")
    assert plan.numeric == ["V1"] and plan.numeric_missing == ["V1"]
    assert list(plan.one_hot) == ["colour"] and plan.frequency == ["city"]
    assert {"const", "note"} <= set(plan.ignored)
    result = evaluate(data, modes=("central",))
    assert result["central"]["overall"]["roc_auc"] > 0.9
    assert list(result["central"]["retailers"]) == ["all"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ([{"a": "1", "y": "maybe"}, {"a": "2", "y": "0"}], "not binary"),
        ([{"a": "1", "b": "0"}], "no label column found"),
        ([{"a": "1", "is_fraud": ""}], "has no values"),
    ],
)
def test_clear_errors(table, message) -> None:
    with pytest.raises(DataError, match=message):
        prepare(table, label="y" if "y" in table[0] else None)


def test_cli_generate_and_evaluate(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d.csv"
    assert main(["generate", "--retailers", "2", "--days", "3", "--tx-per-day", "100",
                 "--fraud-scale", "10", "--seed", "5", "--out", str(out)]) == 0
    assert main(["evaluate", "--data", str(out), "--mode", "all", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"local", "central", "federated"}  # all: federated too (fl/)
    for mode in result.values():
        assert {"roc_auc", "average_precision", "n", "frauds"} <= set(mode["overall"])
        assert set(mode["retailers"]) == {"retailer_1", "retailer_2"}
    assert main(["evaluate", "--data", str(out), "--label", "amount"]) == 2
    assert main(["evaluate", "--data", str(tmp_path / "missing.csv")]) == 2
    assert main(["evaluate", "--data", str(out), "--mode", "federated-typo"]) == 2
    assert main(["generate", "--out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "not binary" in err and "no such file" in err and "Traceback" not in err
