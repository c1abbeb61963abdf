"""``qsfraud evaluate``: prequential evaluation of the default model on a CSV/JSONL table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from fraud.evaluation import MODES, DataError, evaluate, prepare, read_table
from fraud.models import LINEAR_SPEC, check_spec
from fraud.schema import SchemaError
from qsfraud.cli import CommandError


def _fmt(value: Any) -> str:
    return "   n/a" if value is None else f"{value:6.4f}"


def _river_model(choice: str) -> list[dict[str, Any]] | None:
    """``--model``: ``default`` (RiskModel), ``river-linear`` (River's StandardScaler |
    LogisticRegression) or a River spec as JSON (``fraud/models/river_spec.py``)."""
    if choice == "default":
        return None
    if choice == "river-linear":
        return list(LINEAR_SPEC)
    try:
        return check_spec(json.loads(choice))
    except json.JSONDecodeError as exc:
        raise CommandError(f"--model: default, river-linear or a JSON spec ({exc})") from None
    except SchemaError as exc:
        raise CommandError(f"--model: {exc}") from None


def run(args: argparse.Namespace) -> int:
    modes = list(MODES) if args.mode == "all" else [args.mode]
    if args.mode != "all" and args.mode not in MODES:
        raise CommandError(f"unknown mode {args.mode!r}; choose from {', '.join(MODES)} or all")
    started = time.perf_counter()
    try:
        rows = read_table(args.data)
        data = prepare(rows, label=args.label, time=args.time, retailer=args.retailer,
                       id=args.id, ignore=[c for c in (args.ignore or "").split(",") if c])
        result = evaluate(data, modes, river_model=_river_model(args.model))
    except DataError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot read {args.data}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    plan = data.plan
    print(f"{args.data}: {len(data.labels)} rows, {sum(data.labels)} frauds; label "
          f"{plan.label!r}, time {plan.time!r}, retailer {plan.retailer!r}")
    for note in plan.notes:
        print(f"  note: {note}")
    if plan.numeric or plan.one_hot or plan.frequency:
        print(f"  numeric: {plan.numeric}; one-hot: {list(plan.one_hot)}; "
              f"frequency: {plan.frequency}")
    if plan.ignored:
        print(f"  ignored: {plan.ignored}")
    print(f"{'mode':8} {'retailer':16} {'n':>8} {'frauds':>7} {'ROC AUC':>8} {'AP':>7} "
          f"{'R@1%FPR':>8}")
    for mode, res in result.items():
        for name, rep in [("overall", res["overall"]), *res["retailers"].items()]:
            print(f"{mode:8} {name:16} {rep['n']:8d} {rep['frauds']:7d} "
                  f"{_fmt(rep['roc_auc']):>8} {_fmt(rep['average_precision']):>7} "
                  f"{_fmt(rep['recall_at_fpr']):>8}")
    print(f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("evaluate", help="prequential local/central evaluation of a CSV/JSONL")
    p.add_argument("--data", required=True, help="a .csv or .jsonl file")
    p.add_argument("--label", help="label column (default: is_fraud, isFraud, Class, ...)")
    p.add_argument("--time", help="time column, numbers or ISO 8601 (default: auto; else order)")
    p.add_argument("--retailer", help="retailer column (default: retailer_id if present)")
    p.add_argument("--id", help="transaction id column, never a feature (default: tx_id...)")
    p.add_argument("--ignore", help="comma-separated columns to leave out")
    p.add_argument("--mode", default="all", help=f"{', '.join(MODES)} or all (default all)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--model", default="default",
                   help="default, river-linear, or a River spec as JSON, e.g. "
                   '\'[{"class": "tree.HoeffdingAdaptiveTreeClassifier"}]\'')
    p.set_defaults(func=run)
