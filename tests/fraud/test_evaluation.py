"""``evaluate``: streamed columnar loading, column mapping, River baseline, label delay."""

from __future__ import annotations

import csv
import json
import math
import os
import random
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from fraud.evaluation import DataError, Options, evaluate, load, prepare, vectors
from fraud.metrics import report
from qsfraud.cli import main

HANDBOOK = Path(os.environ.get("QSFRAUD_DEV_DATA", Path.home() / ".cache/qsfraud-dev-data")
                ) / "handbook_transactions.csv"
HANDBOOK_MAP = ["amount=TX_AMOUNT", "customer_id=CUSTOMER_ID",
                "payment_instrument=CUSTOMER_ID", "device_id=TERMINAL_ID"]


def handbook_like(n: int, seed: int = 1) -> list[dict[str, str]]:
    """Rows with the handbook's columns: compromised terminals and big amounts are fraud."""
    rng = random.Random(seed)
    bad_terminals = {3, 7}
    rows = []
    for i in range(n):
        terminal = rng.randrange(20)
        amount = rng.uniform(5, 150) if rng.random() > 0.01 else rng.uniform(221, 400)
        scenario = 1 if amount > 220 else 2 if terminal in bad_terminals and i > n // 3 else 0
        t = i * 600
        rows.append({"TRANSACTION_ID": str(i), "TX_DATETIME": f"2018-04-{1 + t // 86400:02d} "
                     f"{t % 86400 // 3600:02d}:{t % 3600 // 60:02d}:00",
                     "CUSTOMER_ID": str(rng.randrange(50)), "TERMINAL_ID": str(terminal),
                     "TX_AMOUNT": f"{amount:.2f}", "TX_FRAUD": "1" if scenario else "0",
                     "TX_FRAUD_SCENARIO": str(scenario)})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_a_present_zero_is_not_missing_and_river_sees_missing_as_absent() -> None:
    rows = [{"x": ["0.0", "", "1.5", "0"][i % 4], "colour": "rb"[i % 2], "is_fraud": i % 2}
            for i in range(40)]
    data = prepare(rows)
    assert data.plan.numeric_missing == ["x"] and list(data.plan.one_hot) == ["colour"]
    got = list(islice(vectors(data), 4))
    assert [x["x__missing"] for x, _ in got] == [0.0, 1.0, 0.0, 0.0]
    assert [x["x"] for x, _ in got] == [0.0, 0.0, 1.5, 0.0]
    assert [xr.get("x") for _, xr in got] == [0.0, None, 1.5, 0.0]
    assert got[0][1] == {"x": 0.0, "colour=r": 1.0} and got[1][1] == {"colour=b": 1.0}


def test_label_history_sees_a_label_only_after_the_delay() -> None:
    rows = handbook_like(3000)
    mapping = {"amount": "TX_AMOUNT", "device_id": "TERMINAL_ID"}
    data = prepare(rows, label="TX_FRAUD", time="TX_DATETIME", ignore=["TX_FRAUD_SCENARIO"],
                   mapping=mapping)
    assert data.plan.canonical == ["amount", "device_id"]
    assert "TX_FRAUD_SCENARIO" in data.plan.ignored

    def seen(delay: float) -> float:
        return sum(x["device_frauds_60d"] for x, _ in vectors(data, Options(label_delay=delay)))

    assert seen(0.0) > seen(7 * 86400.0) > 0.0 == seen(1e12)


def test_handbook_like_table_through_the_cli(tmp_path: Path, capsys) -> None:
    path = write_csv(tmp_path / "hb.csv", handbook_like(2500))
    args = ["evaluate", "--data", str(path), "--label", "TX_FRAUD", "--time", "TX_DATETIME",
            "--retailer", "TERMINAL_ID%5", "--ignore", "TX_FRAUD_SCENARIO",
            "--label-delay", "86400", "--baseline", "river", "--map", *HANDBOOK_MAP]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    # --mode all: local, central and federated (River is not federated: no federated/river)
    assert set(result) == {"local", "central", "federated", "local/river", "central/river"}
    for mode in result.values():
        assert mode["overall"]["n"] == 2500
        assert set(mode["retailers"]) == {f"TERMINAL_ID%5={k}" for k in range(5)}
    assert result["central"]["overall"]["roc_auc"] > 0.8
    run = json.loads(err.strip().splitlines()[-1])["run"]
    assert run["rows"] == 2500 and run["peak_rss_mb"] > 0 and run["rows_per_s"] > 0
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "central/river" in text and "peak RSS" in text and "rows/s" in text
    assert "customer_id=CUSTOMER_ID" in text and "retailer = TERMINAL_ID % 5" in text
    assert main([*args[:-5], "--map", "amount=NOPE"]) == 2
    assert main([*args[:-5], "--map", "colour=TX_AMOUNT"]) == 2
    assert main(["evaluate", "--data", str(path), "--label", "TX_FRAUD", "--ignore", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no column 'NOPE'" in err and "cannot map 'colour'" in err and "cannot ignore" in err


cells = st.one_of(st.sampled_from(["", "NA", "0", "0.0", "1.5", "-3", "red", "blue", " 7 ",
                                   "True", "False"]),
                  st.integers(-5, 5).map(str))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(cells, cells, st.sampled_from(["0", "1", "true", "no"]),
                          st.integers(0, 50)), min_size=1, max_size=60))
def test_a_streamed_csv_reads_like_its_rows(tmp_path_factory, table) -> None:
    rows = [{"a": a, "b": b, "label": y, "time": str(t)} for a, b, y, t in table]
    path = write_csv(tmp_path_factory.mktemp("t") / "t.csv", rows)
    streamed, direct = load(path), prepare(rows)
    assert streamed.plan == direct.plan
    assert streamed.labels.tolist() == direct.labels.tolist()
    assert streamed.times.tolist() == direct.times.tolist()
    assert [(x, xr) for x, xr in vectors(streamed)] == [(x, xr) for x, xr in vectors(direct)]


def test_a_boolean_column_is_one_hot_from_a_file_and_from_rows(tmp_path: Path) -> None:
    rows = [{"present": ["True", "False"][i % 2], "is_fraud": ["True", "False"][i % 3 == 0]}
            for i in range(30)]
    for data in (load(write_csv(tmp_path / "b.csv", rows)), prepare(rows)):
        assert data.plan.one_hot == {"present": ["False", "True"]}
        assert int(data.labels.sum()) == 20


def test_metrics_are_scikit_learns_to_the_reported_six_digits() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(5000) < 0.05
    s = np.round(rng.random(5000) + y * 0.3, 2)  # ties on purpose
    rep = report(y, s)
    assert math.isclose(rep["roc_auc"], roc_auc_score(y, s), abs_tol=1e-6)
    assert math.isclose(rep["average_precision"], average_precision_score(y, s), abs_tol=1e-6)


def test_unknown_baseline_is_an_error() -> None:
    data = prepare([{"x": str(i), "is_fraud": i % 2} for i in range(10)])
    with pytest.raises(DataError, match="unknown baseline"):
        evaluate(data, baseline="sklearn")


@pytest.mark.skipif(not HANDBOOK.is_file(), reason=f"no handbook data at {HANDBOOK} "
                    "(unpack it with ../shared/data/get-dev-data.sh)")
def test_first_rows_of_the_handbook_with_the_river_baseline(tmp_path: Path) -> None:
    with HANDBOOK.open() as fh:
        head = list(islice(fh, 20_001))
    path = tmp_path / "handbook_head.csv"
    path.write_text("".join(head))
    data = load(path, label="TX_FRAUD", time="TX_DATETIME", retailer="TERMINAL_ID%5",
                ignore=["TX_FRAUD_SCENARIO"],
                mapping=dict(m.split("=") for m in HANDBOOK_MAP))
    assert len(data) == 20_000 and data.plan.id == "TRANSACTION_ID"
    assert "TX_FRAUD_SCENARIO" not in data.plan.numeric
    result = evaluate(data, modes=("central",), baseline="river", label_delay=7 * 86400.0)
    ours, river = result["central"]["overall"], result["central/river"]["overall"]
    assert (ours["n"], ours["frauds"]) == (river["n"], river["frauds"]) == (20_000, 18)
    assert 0.0 <= ours["roc_auc"] <= 1.0 and 0.0 <= river["roc_auc"] <= 1.0
