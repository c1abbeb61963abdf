"""``qsfraud evaluate``: prequential evaluation of the default model on a CSV/JSONL table."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import TYPE_CHECKING, Any

from qsfraud.cli import CommandError

if TYPE_CHECKING:
    from fraud.evaluation import ModeRunner

# fraud.evaluation and fraud.models import River, numba and scipy (~2 s): only when evaluating,
# not in every command's start-up (a CDC process's start would wait for them)
MODE_NAMES = ("local", "central")
#: Modes the command adds from fl/ (``fraud`` imports nothing of ``fl``).
FEDERATED_MODES = ("federated",)


def _fmt(value: Any) -> str:
    return "   n/a" if value is None else f"{value:6.4f}"


def _river_model(choice: str) -> list[dict[str, Any]] | None:
    """``--model``: ``default`` (RiskModel), ``river-linear`` (River's StandardScaler |
    LogisticRegression) or a River spec as JSON (``fraud/models/river_spec.py``)."""
    from fraud.models import LINEAR_SPEC, check_spec
    from fraud.schema import SchemaError

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


def _pairs(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, column = item.partition("=")
        if not sep or not name or not column:
            raise CommandError(f"--map expects CANONICAL=COLUMN, got {item!r}")
        out[name] = column
    return out


def _list(items: list[str] | None) -> list[str]:
    return [c for item in items or () for c in item.split(",") if c]


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _runners(args: argparse.Namespace) -> dict[str, ModeRunner]:
    """The evaluation's modes plus ``federated`` (:mod:`fl.simulation`) for these flags."""
    from fl.simulation import Settings, runner
    from fraud.evaluation import MODES

    try:
        settings = Settings(sync_every=args.sync_every, strategy=args.strategy)
    except ValueError as exc:
        raise CommandError(f"--sync-every/--strategy: {exc}") from None
    return {**MODES, FEDERATED_MODES[0]: runner(settings)}


def run(args: argparse.Namespace) -> int:
    from fraud.evaluation import DataError, evaluate, load

    runners = _runners(args)
    if args.model not in ("default", "river-linear"):  # what fl/ federates; `all` leaves
        # any other model's federated mode out
        if args.mode in FEDERATED_MODES:
            raise CommandError(f"--mode {args.mode} federates the default model and "
                               f"river-linear only, not --model {args.model}")
        runners = {name: run for name, run in runners.items() if name not in FEDERATED_MODES}
    modes = list(runners) if args.mode == "all" else [args.mode]
    if args.mode != "all" and args.mode not in runners:
        raise CommandError(f"unknown mode {args.mode!r}; choose from {', '.join(runners)} "
                           "or all")
    started = time.perf_counter()
    try:
        data = load(args.data, label=args.label, time=args.time, retailer=args.retailer,
                    id=args.id, ignore=_list(args.ignore), mapping=_pairs(args.map))
        loaded = time.perf_counter()
        result = evaluate(data, modes, baseline=args.baseline, label_delay=args.label_delay,
                          river_model=_river_model(args.model), runners=runners)
    except DataError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot read {args.data}: {exc.strerror or exc}") from None
    elapsed = time.perf_counter() - started
    runs = len(modes) * (2 if args.baseline else 1)
    stats = {"rows": len(data), "seconds": round(elapsed, 1),
             "load_seconds": round(loaded - started, 1),
             "rows_per_s": round(len(data) * len(modes) / max(elapsed - (loaded - started),
                                                               1e-9)),
             "model_runs": runs, "peak_rss_mb": round(peak_rss_mb(), 1)}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        print(json.dumps({"run": stats}, sort_keys=True), file=sys.stderr)
        return 0
    plan = data.plan
    print(f"{args.data}: {len(data)} rows, {int(data.labels.sum())} frauds; label "
          f"{plan.label!r}, time {plan.time!r}, retailer {plan.retailer!r}")
    for note in plan.notes:
        print(f"  note: {note}")
    if plan.numeric or plan.one_hot or plan.frequency:
        print(f"  numeric: {plan.numeric}; one-hot: {list(plan.one_hot)}; "
              f"frequency: {plan.frequency}")
    if plan.ignored:
        print(f"  ignored: {plan.ignored}")
    print(f"{'mode':14} {'retailer':16} {'n':>8} {'frauds':>7} {'ROC AUC':>8} {'AP':>7} "
          f"{'R@1%FPR':>8}")
    for mode, res in result.items():
        for name, rep in [("overall", res["overall"]), *res["retailers"].items()]:
            print(f"{mode:14} {name:16} {rep['n']:8d} {rep['frauds']:7d} "
                  f"{_fmt(rep['roc_auc']):>8} {_fmt(rep['average_precision']):>7} "
                  f"{_fmt(rep['recall_at_fpr']):>8}")
    print(f"{stats['rows']} rows in {stats['seconds']} s (load {stats['load_seconds']} s), "
          f"{stats['rows_per_s']} rows/s per mode, {runs} model runs; "
          f"peak RSS {stats['peak_rss_mb']} MiB")
    print(f"({elapsed:.1f} s)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("evaluate",
                       help="prequential local/central/federated evaluation of a CSV/JSONL")
    p.add_argument("--data", required=True, help="a .csv or .jsonl file")
    p.add_argument("--label", help="label column (default: is_fraud, isFraud, Class, ...)")
    p.add_argument("--time", help="time column, numbers or ISO 8601 (default: auto; else order)")
    p.add_argument("--retailer", help="retailer column, or COLUMN%%K for its integer value "
                   "modulo K (default: retailer_id if present)")
    p.add_argument("--id", help="transaction id column, never a feature (default: tx_id...)")
    p.add_argument("--ignore", nargs="+", metavar="COLUMN",
                   help="columns to leave out (space- or comma-separated)")
    p.add_argument("--map", nargs="+", metavar="CANONICAL=COLUMN",
                   help="take a canonical column (amount, customer_id, payment_instrument, "
                   "device_id, ip, ...) from another column, e.g. customer_id=CUSTOMER_ID")
    p.add_argument("--baseline", choices=["river"],
                   help="also run River's StandardScaler | LogisticRegression, same rows")
    p.add_argument("--label-delay", type=float, default=0.0, metavar="SECONDS",
                   help="seconds after a transaction before its label feeds the label-history "
                   "features (default 0; e.g. 604800 for a 7-day chargeback delay)")
    p.add_argument("--mode", default="all",
                   help=f"{', '.join((*MODE_NAMES, *FEDERATED_MODES))} or all (default all)")
    p.add_argument("--sync-every", type=int, default=500, metavar="N",
                   help="federated mode: a retailer sends an update every N of its own rows "
                   "(default 500)")
    p.add_argument("--strategy", default="fedavg",
                   choices=["fedavg", "fedmedian", "fedtrimmedavg"],
                   help="federated mode: the aggregation strategy (default fedavg)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--model", default="default",
                   help="default, river-linear, or a River spec as JSON, e.g. "
                   '\'[{"class": "tree.HoeffdingAdaptiveTreeClassifier"}]\'')
    p.set_defaults(func=run)
