"""Prequential (test-then-train) evaluation of the default model on any CSV/JSONL table.

Rows are replayed in time order; each is scored, then learned (labels are assumed known right
after scoring, the usual prequential protocol). Modes:

* ``local``: each retailer has its own feature state and model and sees only its own rows;
* ``central``: one feature state and one model over every retailer's rows (the upper bound no
  retailer could legally have).

Columns: the canonical transaction columns (``amount``, ``customer_id``,
``payment_instrument``, ``device_id``, ``ip``, ``channel``, ``coupon_code``, ``item_count``,
``address_mismatch``) get the streaming features of :mod:`fraud.features` when ``amount`` and
an entity column are present; any other column is profiled once: numeric columns are used as
features (missing values -> 0 plus a ``<col>__missing`` flag), low-cardinality categorical
columns are one-hot encoded, higher-cardinality ones get an online frequency encoding, and
constant or ID-like columns are ignored. Columns that would leak the label (``scenario``,
``label_source``, ``labelled_at``) are ignored too.

>>> rows = [{"t": str(i), "shop": "a" if i % 2 else "b", "x": str(i % 10),
...          "fraud": "1" if i % 10 == 9 else "0"} for i in range(1000)]
>>> data = prepare(rows, label="fraud", time="t", retailer="shop")
>>> data.plan.numeric, data.plan.ignored
(['x'], [])
>>> result = evaluate(data, modes=("local",))
>>> result["local"]["overall"]["n"], result["local"]["overall"]["frauds"]
(1000, 100)
>>> result["local"]["overall"]["roc_auc"] > 0.9
True
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fraud.features import FeatureExtractor
from fraud.metrics import report
from fraud.models import ModelParams, RiskModel
from fraud.schema import SchemaError, parse_timestamp

LABEL_CANDIDATES: Final = ("is_fraud", "isFraud", "fraud", "is_fraudulent", "fraud_bool",
                           "Class", "class", "label", "target")
TIME_CANDIDATES: Final = ("occurred_at", "timestamp", "event_time", "time", "Time", "step",
                          "unix_time", "trans_date_trans_time", "TransactionDT", "datetime",
                          "date")
RETAILER_CANDIDATES: Final = ("retailer_id", "retailer", "merchant_id")
ID_CANDIDATES: Final = ("tx_id", "transaction_id", "TransactionID", "trans_num", "id")
LEAKY: Final = ("scenario", "label_source", "labelled_at")
CANONICAL: Final = ("amount", "customer_id", "payment_instrument", "device_id", "ip", "channel",
                    "coupon_code", "item_count", "address_mismatch")
ENTITY_COLUMNS: Final = ("customer_id", "payment_instrument", "device_id", "ip")
TRUE: Final = frozenset(("1", "1.0", "true", "t", "yes", "y"))
FALSE: Final = frozenset(("0", "0.0", "false", "f", "no", "n"))
MAX_ONE_HOT: Final = 12
ALL_RETAILERS: Final = "all"


class DataError(ValueError):
    """The table cannot be evaluated (missing or non-binary label, unreadable file...)."""


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.csv`` (strings) or ``.jsonl`` (JSON values) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    suffix = path.suffix.lower()
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            if suffix in (".jsonl", ".ndjson"):
                rows = []
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path.name}:{lineno}: not JSON ({exc.msg})") from None
                    if not isinstance(value, dict):
                        raise DataError(f"{path.name}:{lineno}: expected a JSON object per line")
                    rows.append(value)
                return rows
            if suffix not in (".csv", ".tsv", ".txt"):
                raise DataError(f"unsupported file type {suffix!r}: use .csv or .jsonl")
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames:
                raise DataError(f"{path.name}: empty file (no header row)")
            return [dict(row) for row in reader]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{path.name}: malformed CSV ({exc})") from None


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in ("", "NA", "NaN", "nan",
                                                                           "null", "None"))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        f = float(value)
    else:
        try:
            f = float(str(value).strip())
        except ValueError:
            return None
    return f if math.isfinite(f) else None


def _label_value(value: Any) -> bool | None:
    if _missing(value):
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(text)


@dataclass(slots=True)
class ColumnPlan:
    """How each column is used; decided once from the whole table (types only, never labels)."""

    label: str
    time: str | None
    retailer: str | None
    id: str | None
    canonical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    numeric_missing: list[str] = field(default_factory=list)
    one_hot: dict[str, list[str]] = field(default_factory=dict)
    frequency: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Prepared:
    """Rows parsed and sorted in time order, with their labels and retailers."""

    plan: ColumnPlan
    times: list[float]
    labels: list[bool]
    retailers: list[str]
    canonical: list[tuple[Any, ...]]
    numeric: list[list[float | None]]
    categorical: list[list[str | None]]
    skipped: int = 0


def _pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str],
                 what: str, required: bool) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"no {what} column {wanted!r}; columns are: {', '.join(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name.lower() in lowered:
            return lowered[name.lower()]
    if required:
        raise DataError(
            f"no {what} column found (tried {', '.join(candidates)}); pass --{what} COLUMN"
        )
    return None


def _parse_time(value: Any) -> float | None:
    if _missing(value):
        return None
    number = _number(value)
    if number is not None:
        return number
    try:
        return parse_timestamp(str(value), "time")
    except SchemaError:
        return None


def prepare(
    rows: Sequence[Mapping[str, Any]],
    label: str | None = None,
    time: str | None = None,
    retailer: str | None = None,
    id: str | None = None,
    ignore: Iterable[str] = (),
) -> Prepared:
    """Profile columns, parse values, drop unlabelled rows and sort by time (stable)."""
    if not rows:
        raise DataError("the table has no rows")
    columns: list[str] = []
    seen: set[str] = set()
    for row in rows[:1000]:
        for c in row:
            if c not in seen:
                seen.add(c)
                columns.append(c)
    label_col = _pick_column(columns, label, LABEL_CANDIDATES, "label", True)
    assert label_col is not None
    time_col = _pick_column(columns, time, TIME_CANDIDATES, "time", False)
    retailer_col = _pick_column(columns, retailer, RETAILER_CANDIDATES, "retailer", False)
    id_col = _pick_column(columns, id, ID_CANDIDATES, "id", False)
    plan = ColumnPlan(label_col, time_col, retailer_col, id_col)

    labels: list[bool | None] = []
    bad: dict[str, None] = {}
    for row in rows:
        try:
            labels.append(_label_value(row.get(label_col)))
        except ValueError as exc:
            bad[str(exc)] = None
            if len(bad) > 5:
                break
    if bad:
        raise DataError(
            f"label column {label_col!r} is not binary: found {', '.join(map(repr, list(bad)[:5]))}"
            " (expected 0/1, true/false or yes/no)"
        )
    keep = [i for i, y in enumerate(labels) if y is not None]
    skipped = len(rows) - len(keep)
    if not keep:
        raise DataError(f"label column {label_col!r} has no values")
    if skipped:
        plan.notes.append(f"skipped {skipped} rows without a label")

    times: list[float] = []
    if time_col is not None:
        parsed = [_parse_time(rows[i].get(time_col)) for i in keep]
        unparsed = sum(t is None for t in parsed)
        if unparsed > len(parsed) // 2:
            if time is not None:
                raise DataError(f"time column {time_col!r} is not numbers or ISO 8601 timestamps")
            plan.notes.append(f"column {time_col!r} is not a time; using file order")
            plan.time = time_col = None
        else:
            last = 0.0
            for t in parsed:
                last = t if t is not None else last
                times.append(last)
    if time_col is None:
        times = [float(i) for i in range(len(keep))]
    order = sorted(range(len(keep)), key=times.__getitem__)
    keep = [keep[j] for j in order]
    times = [times[j] for j in order]

    reserved = {label_col, time_col, retailer_col, id_col, *LEAKY, *ignore}
    entity_present = [c for c in ENTITY_COLUMNS if c in columns]
    use_canonical = "amount" in columns and bool(entity_present)
    if use_canonical:
        plan.canonical = [c for c in CANONICAL if c in columns]
        reserved.update(plan.canonical)
        plan.notes.append(f"streaming features from {', '.join(plan.canonical)}")
    plan.ignored = [c for c in columns if c in (*LEAKY, *ignore) and c not in
                    (label_col, time_col, retailer_col, id_col)]

    kept_rows = [rows[i] for i in keep]
    n = len(kept_rows)
    for c in columns:
        if c in reserved:
            continue
        values = [r.get(c) for r in kept_rows]
        present = [v for v in values if not _missing(v)]
        if not present:
            plan.ignored.append(c)
            continue
        numbers = [_number(v) for v in present]
        numeric_share = sum(x is not None for x in numbers) / len(present)
        distinct = len({str(v) for v in present})
        if distinct <= 1 and len(present) == n:
            plan.ignored.append(c)
        elif numeric_share >= 0.95:
            ints = all(x is not None and x.is_integer() for x in numbers)
            if ints and distinct == len(present) and distinct > 100:
                plan.ignored.append(c)  # a running number: an ID
            else:
                plan.numeric.append(c)
                if len(present) < n:
                    plan.numeric_missing.append(c)
        elif distinct <= MAX_ONE_HOT:
            plan.one_hot[c] = sorted({str(v) for v in present})
        elif distinct > 0.5 * len(present) and distinct > 100:
            plan.ignored.append(c)  # identifiers, free text
        else:
            plan.frequency.append(c)

    canonical = []
    if use_canonical:
        cols = plan.canonical
        for r in kept_rows:
            canonical.append(tuple(r.get(c) for c in cols))
    numeric = [[_number(r.get(c)) if not _missing(r.get(c)) else None for c in plan.numeric]
               for r in kept_rows]
    cat_cols = [*plan.one_hot, *plan.frequency]
    categorical = [[None if _missing(r.get(c)) else str(r.get(c)) for c in cat_cols]
                   for r in kept_rows]
    retailers = ([str(r.get(retailer_col) or "?") for r in kept_rows] if retailer_col
                 else [ALL_RETAILERS] * n)
    return Prepared(plan, times, [bool(labels[i]) for i in keep], retailers, canonical, numeric,
                    categorical, skipped)


class RowEncoder:
    """Turns prepared rows into feature vectors; holds the streaming state of one model."""

    def __init__(self, data: Prepared) -> None:
        self.data = data
        self.plan = data.plan
        self.extractor = FeatureExtractor() if data.plan.canonical else None
        self.state: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.n = 0
        cols = data.plan.canonical
        self.idx = {c: cols.index(c) for c in cols}

    def encode(self, i: int) -> dict[str, float]:
        data, plan = self.data, self.plan
        x: dict[str, float] = {}
        if self.extractor is not None:
            row = data.canonical[i]
            idx = self.idx

            def get(name: str) -> Any:
                j = idx.get(name)
                return None if j is None or _missing(row[j]) else row[j]

            amount = _number(get("amount")) or 0.0
            items = _number(get("item_count"))
            mismatch = get("address_mismatch")
            channel = str(get("channel") or "web").lower()
            x = self.extractor.extract_fields(
                self.state, data.times[i], max(0.0, amount),
                _text(get("customer_id")), _text(get("payment_instrument")),
                _text(get("device_id")), _text(get("ip")), channel, _text(get("coupon_code")),
                int(items) if items is not None and items >= 0 else 1,
                _truthy(mismatch),
            )
        for c, v in zip(plan.numeric, data.numeric[i], strict=True):
            x[c] = v if v is not None else 0.0
        for c in plan.numeric_missing:
            x[c + "__missing"] = 0.0 if x[c] or data.numeric[i][plan.numeric.index(c)] else 1.0
        cats = data.categorical[i]
        k = 0
        for c, levels in plan.one_hot.items():
            value = cats[k]
            for level in levels:
                x[f"{c}={level}"] = 1.0 if value == level else 0.0
            k += 1
        counts = self.counts
        self.n += 1
        for c in plan.frequency:
            key = f"{c}\x00{cats[k]}"
            seen = counts.get(key, 0)
            x[c + "__freq"] = math.log1p(seen)
            counts[key] = seen + 1
            k += 1
        return x


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _truthy(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in TRUE


ModeRunner = Callable[[Prepared, ModelParams], list[float]]


def run_local(data: Prepared, params: ModelParams) -> list[float]:
    """Scores when each retailer trains only on its own rows."""
    encoders: dict[str, RowEncoder] = {}
    models: dict[str, RiskModel] = {}
    scores = []
    for i, (y, r) in enumerate(zip(data.labels, data.retailers, strict=True)):
        enc = encoders.get(r)
        if enc is None:
            enc = encoders[r] = RowEncoder(data)
            models[r] = RiskModel.from_params(params)
        model = models[r]
        x = enc.encode(i)
        scores.append(model.score_one(x, observe=True))
        model.learn_one(x, y)
    return scores


def run_central(data: Prepared, params: ModelParams) -> list[float]:
    """Scores of one model trained on every retailer's rows."""
    enc = RowEncoder(data)
    model = RiskModel.from_params(params)
    scores = []
    for i, y in enumerate(data.labels):
        x = enc.encode(i)
        scores.append(model.score_one(x, observe=True))
        model.learn_one(x, y)
    return scores


MODES: Final[dict[str, ModeRunner]] = {"local": run_local, "central": run_central}
"""Mode name -> runner; other packages (the federated layer) may add theirs."""


def summarize(data: Prepared, scores: Sequence[float]) -> dict[str, Any]:
    """``{"overall": report, "retailers": {name: report}}`` for one mode's scores."""
    by: dict[str, tuple[list[bool], list[float]]] = {}
    for y, r, s in zip(data.labels, data.retailers, scores, strict=True):
        ys, ss = by.setdefault(r, ([], []))
        ys.append(y)
        ss.append(s)
    return {
        "overall": report(data.labels, scores),
        "retailers": {r: report(ys, ss) for r, (ys, ss) in sorted(by.items())},
    }


def evaluate(
    data: Prepared, modes: Sequence[str] = ("local", "central"),
    params: ModelParams | None = None,
) -> dict[str, Any]:
    """Run each mode prequentially and report exact metrics per retailer and overall."""
    params = params or ModelParams()
    out: dict[str, Any] = {}
    for mode in modes:
        runner = MODES.get(mode)
        if runner is None:
            raise DataError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        out[mode] = summarize(data, runner(data, params))
    return out
