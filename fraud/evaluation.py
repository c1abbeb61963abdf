"""Prequential (test-then-train) evaluation of the default model on any CSV/JSONL table.

Rows are replayed in time order; each is scored, then learned (the usual prequential
protocol: the model learns each label right after scoring). Label *history* features are
stricter: a label becomes known to them only ``label_delay`` seconds after its transaction
(delayed chargebacks). Modes:

* ``local``: each retailer has its own feature state and model and sees only its own rows;
* ``central``: one feature state and one model over every retailer's rows (the upper bound no
  retailer could legally have).

``fl.simulation`` adds ``federated`` (``local`` plus federated rounds, through
:func:`run_streams`'s per-row hook); ``qsfraud evaluate`` passes it in with ``runners``.

With ``baseline="river"`` River's ``StandardScaler | LogisticRegression`` runs beside the
default model on the same rows, in the same order and modes, fed the columns as profiled below
(numeric as they are, missing values absent, small categoricals one-hot).

Columns: the canonical transaction columns (``amount``, ``customer_id``,
``payment_instrument``, ``device_id``, ``ip``, ``channel``, ``coupon_code``, ``item_count``,
``address_mismatch``; present under those names or mapped with ``mapping``, e.g.
``{"customer_id": "CUSTOMER_ID"}``) get the streaming features of :mod:`fraud.features` when
``amount`` and an entity column are present; every other column is profiled from the whole
table: numeric columns are used as they are (a missing value is 0 plus a ``<col>__missing``
flag of 1), low-cardinality categorical columns are one-hot encoded, higher-cardinality ones get
an online frequency encoding (the log share of the rows so far with that value), and constant
or ID-like columns are ignored. Columns that would leak the label (``scenario``,
``label_source``, ``labelled_at``) and ``ignore`` are left out.

The table is read once, streaming, into one compact array per column (floats, or codes of the
distinct texts), so memory grows with rows x columns x 8 bytes, not with Python objects.

>>> rows = [{"t": str(i), "shop": "a" if i % 2 else "b", "x": str(i % 10),
...          "fraud": "1" if i % 10 == 9 else "0"} for i in range(1000)]
>>> data = prepare(rows, label="fraud", time="t", retailer="shop")
>>> data.plan.numeric, data.plan.ignored
(['x'], [])
>>> result = evaluate(data, modes=("local",), baseline="river")
>>> result["local"]["overall"]["n"], result["local"]["overall"]["frauds"]
(1000, 100)
>>> result["local"]["overall"]["roc_auc"] > 0.9, result["local/river"]["overall"]["n"]
(True, 1000)
"""

from __future__ import annotations

import csv
import json
import math
import re
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from fraud.features import FeatureExtractor
from fraud.metrics import report
from fraud.models import ModelParams, RiskModel, RiverModel, model_from_config
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
MISSING: Final = frozenset(("", "NA", "NaN", "nan", "null", "None"))
MAX_ONE_HOT: Final = 12
MAX_TEXT_CODES_NUMERIC: Final = 1000
"""A mostly numeric column stops recording its distinct texts beyond this many."""
MAX_TEXT_CODES: Final = 200_000
"""A text column with more distinct values is ignored (identifiers, free text)."""
ALL_RETAILERS: Final = "all"
CHUNK: Final = 4096
_NAN: Final = math.nan


class DataError(ValueError):
    """The table cannot be evaluated (missing or non-binary label, unreadable file...)."""


def _open_checked(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv", ".tsv", ".txt"):
        raise DataError(f"unsupported file type {suffix!r}: use .csv or .jsonl")


def iter_table(path: str | Path) -> Iterator[Mapping[str, Any]]:
    """Rows of a ``.csv`` (strings) or ``.jsonl`` (JSON values) file, one at a time."""
    path = Path(path)
    _open_checked(path)
    suffix = path.suffix.lower()
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            if suffix in (".jsonl", ".ndjson"):
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path.name}:{lineno}: not JSON ({exc.msg})") from None
                    if not isinstance(value, dict):
                        raise DataError(f"{path.name}:{lineno}: expected a JSON object per line")
                    yield value
                return
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames:
                raise DataError(f"{path.name}: empty file (no header row)")
            yield from reader
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{path.name}: malformed CSV ({exc})") from None


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a ``.csv``/``.jsonl`` file as dicts (small files; :func:`load` streams)."""
    return [dict(row) for row in iter_table(path)]


@dataclass(slots=True)
class ColumnPlan:
    """How each column is used; decided once from the whole table (types only, never labels)."""

    label: str
    time: str | None
    retailer: str | None
    id: str | None
    canonical: list[str] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict)
    numeric: list[str] = field(default_factory=list)
    numeric_missing: list[str] = field(default_factory=list)
    one_hot: dict[str, list[str]] = field(default_factory=dict)
    frequency: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Column:
    """One column, compact: a float per row (NaN: absent or not a number) and, while useful,
    a code per row of its distinct texts (-1: absent)."""

    __slots__ = ("codes", "floats", "keep_codes", "levels", "numbers", "present")

    def __init__(self, keep_codes: bool) -> None:
        self.floats = array("d")
        self.codes: array[int] | None = array("i")
        self.levels: dict[str, int] | None = {}
        self.present = 0
        self.numbers = 0
        self.keep_codes = keep_codes

    def add(self, column: pd.Series) -> None:
        """Append a chunk of values (numbers as pandas parsed them, or texts)."""
        if column.dtype.kind in "iuf":
            values = column.to_numpy(np.float64, copy=True, na_value=_NAN)
            present = ~np.isnan(values)
            codes, uniques = pd.factorize(values)
            names = [_number_text(u) for u in uniques.tolist()] if self.levels is not None \
                and self._room(len(uniques), True) else None
        else:
            # texts, also of what pandas parsed as booleans ("True"/"False", as written)
            text = column.astype(object).where(column.notna(), "").astype(str)
            text = text.where(~text.isin(_MISSING_LIST), None)
            codes, uniques = pd.factorize(text)
            present = codes >= 0
            numbers = pd.to_numeric(pd.Series(uniques, dtype=object).str.strip(),
                                    errors="coerce").to_numpy(np.float64, copy=True)
            values = np.where(present, numbers[np.maximum(codes, 0)] if numbers.size else 0.0,
                              _NAN)
            names = [str(u) for u in uniques.tolist()] if self.levels is not None \
                and self._room(len(uniques), False) else None
        values[~np.isfinite(values)] = _NAN
        self.present += int(present.sum())
        self.numbers += int((~np.isnan(values)).sum())
        self.floats.frombytes(values.tobytes())
        if names is None:
            self.levels = self.codes = None
            return
        levels = self.levels
        assert levels is not None and self.codes is not None
        known = np.array([levels.setdefault(u, len(levels)) for u in names], dtype=np.int32)
        out = np.where(codes >= 0, known[np.maximum(codes, 0)] if known.size else -1, -1)
        self.codes.frombytes(out.astype(np.int32).tobytes())

    def _room(self, more: int, numeric_chunk: bool) -> bool:
        """Whether to keep recording distinct texts after ``more`` new ones (at most)."""
        if self.keep_codes or self.levels is None:
            return self.levels is not None
        total = len(self.levels) + more
        if total > MAX_TEXT_CODES:
            return False
        mostly_numbers = numeric_chunk and self.numbers * 20 >= self.present * 19
        return not (mostly_numbers and total > MAX_TEXT_CODES_NUMERIC)

    def texts(self) -> list[str]:
        """Distinct texts in code order."""
        assert self.levels is not None
        return list(self.levels)


_MISSING_LIST: Final = sorted(MISSING)


def _number_text(value: float) -> str:
    """The text of a parsed number, as it was most likely written (``3`` for 3.0)."""
    return str(int(value)) if value.is_integer() else repr(value)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _record_chunks(rows: Iterator[Mapping[str, Any]], columns: list[str]
                   ) -> Iterator[pd.DataFrame]:
    """Rows of mappings as DataFrames of texts, :data:`CHUNK` rows at a time."""
    while True:
        chunk = [row for _, row in zip(range(CHUNK), rows, strict=False)]
        if not chunk:
            return
        yield pd.DataFrame({c: [_as_text(r.get(c)) for r in chunk] for c in columns},
                           dtype=object)


def _csv_chunks(path: Path) -> tuple[list[str], Iterator[pd.DataFrame]]:
    """The header and the rows of a CSV/TSV as DataFrames of texts, streamed."""
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        reader = pd.read_csv(path, sep=sep, keep_default_na=False, na_values=_MISSING_LIST,
                             encoding="utf-8-sig", chunksize=65536, engine="c",
                             low_memory=False)
        first = next(iter(reader), None)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name}: not UTF-8 text ({exc.reason})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path.name}: empty file (no header row)") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{path.name}: malformed CSV ({exc})") from None
    if first is None:
        raise DataError("the table has no rows")
    columns = [str(c) for c in first.columns]

    def chunks() -> Iterator[pd.DataFrame]:
        yield first
        try:
            yield from reader
        except UnicodeDecodeError as exc:
            raise DataError(f"{path.name}: not UTF-8 text ({exc.reason})") from None
        except (pd.errors.ParserError, ValueError) as exc:
            raise DataError(f"{path.name}: malformed CSV ({exc})") from None

    return columns, chunks()


@dataclass(slots=True)
class Prepared:
    """The table in time order: labels, times, retailers and compact columns."""

    plan: ColumnPlan
    times: np.ndarray
    labels: np.ndarray
    retailers: list[str]
    columns: dict[str, _Column]
    order: np.ndarray
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.order.size)


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


def _times(text: pd.Series) -> np.ndarray:
    """Seconds since the epoch of numbers or ISO 8601 texts (naive ones are UTC); NaN else."""
    t = pd.to_numeric(text, errors="coerce").to_numpy(np.float64, copy=True)
    rest = np.isnan(t) & (text != "").to_numpy()
    if rest.any():
        stamps = pd.to_datetime(text[rest], errors="coerce", utc=True, format="ISO8601")
        parsed = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(
            np.float64, copy=True)
        still = np.isnan(parsed)
        if still.any():  # what pandas does not read, the schema's own parser may
            values = text[rest].to_numpy()
            parsed[still] = [_parse_time(v) for v in values[still]]
        t[rest] = parsed
    return t


def _parse_time(value: str) -> float:
    try:
        return parse_timestamp(value, "time")
    except SchemaError:
        return _NAN


_MODULO = re.compile(r"^(?P<col>.+)%(?P<k>[0-9]+)$")


def prepare(
    rows: Iterable[Mapping[str, Any]],
    label: str | None = None,
    time: str | None = None,
    retailer: str | None = None,
    id: str | None = None,
    ignore: Iterable[str] = (),
    mapping: Mapping[str, str] | None = None,
) -> Prepared:
    """Profile columns, parse values, drop unlabelled rows and sort by time (stable).

    ``rows`` is consumed once, in chunks; the columns are those of the first 1000 rows.
    ``retailer`` may be ``COLUMN%K`` (the column's integer value modulo K). ``mapping`` maps
    canonical names to columns of the table. :func:`load` does the same from a file.
    """
    it = iter(rows)
    head = [row for _, row in zip(range(1000), it, strict=False)]
    if not head:
        raise DataError("the table has no rows")
    columns: list[str] = []
    seen: set[str] = set()
    for row in head:
        for c in row:
            if c not in seen:
                seen.add(c)
                columns.append(c)
    return _ingest(columns, _record_chunks(_chain(head, it), columns), label, time, retailer,
                   id, ignore, mapping)


def load(
    path: str | Path,
    label: str | None = None,
    time: str | None = None,
    retailer: str | None = None,
    id: str | None = None,
    ignore: Iterable[str] = (),
    mapping: Mapping[str, str] | None = None,
) -> Prepared:
    """:func:`prepare` of a ``.csv``/``.tsv`` (streamed through pandas' C parser, in chunks)
    or ``.jsonl`` file; never the whole table as Python objects."""
    path = Path(path)
    _open_checked(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return prepare(iter_table(path), label, time, retailer, id, ignore, mapping)
    columns, chunks = _csv_chunks(path)
    return _ingest(columns, chunks, label, time, retailer, id, ignore, mapping)


def _ingest(
    columns: list[str],
    chunks: Iterator[pd.DataFrame],
    label: str | None,
    time: str | None,
    retailer: str | None,
    id: str | None,
    ignore: Iterable[str],
    mapping: Mapping[str, str] | None,
) -> Prepared:
    mapping = dict(mapping or {})
    for canon, source in mapping.items():
        if canon not in CANONICAL:
            raise DataError(f"cannot map {canon!r}: canonical columns are {', '.join(CANONICAL)}")
        if source not in columns:
            raise DataError(f"no column {source!r} to map to {canon!r}; columns are: "
                            f"{', '.join(columns)}")
    label_col = _pick_column(columns, label, LABEL_CANDIDATES, "label", True)
    assert label_col is not None
    time_col = _pick_column(columns, time, TIME_CANDIDATES, "time", False)
    modulo = None
    if retailer is not None and (m := _MODULO.match(retailer)) and retailer not in columns:
        retailer, modulo = m["col"], int(m["k"])
        if modulo < 1:
            raise DataError("retailer COLUMN%K needs K >= 1")
    retailer_col = _pick_column(columns, retailer, RETAILER_CANDIDATES, "retailer", False)
    id_col = _pick_column(columns, id, ID_CANDIDATES, "id", False)
    plan = ColumnPlan(label_col, time_col, retailer_col, id_col)
    for canon in CANONICAL:
        if canon not in mapping and canon in columns:
            mapping[canon] = canon
    ignore = set(ignore)
    unknown = ignore - set(columns)
    if unknown:
        raise DataError(f"cannot ignore {', '.join(sorted(unknown))}: no such column")
    entity_present = [c for c in ENTITY_COLUMNS if c in mapping]
    if "amount" in mapping and entity_present:
        plan.canonical = [c for c in CANONICAL if c in mapping]
        plan.mapping = {c: mapping[c] for c in plan.canonical}
        plan.notes.append("streaming features from " + ", ".join(
            c if plan.mapping[c] == c else f"{c}={plan.mapping[c]}" for c in plan.canonical))
    special = {label_col, time_col, retailer_col, id_col}
    plan.ignored = [c for c in columns if c in (*LEAKY, *ignore) and c not in special]
    mapped_sources = set(plan.mapping.values())
    text_sources = {src for canon, src in plan.mapping.items()
                    if canon not in ("amount", "item_count")}
    stored = [c for c in columns if c not in special and c not in plan.ignored]
    if retailer_col is not None and retailer_col not in stored:
        stored.append(retailer_col)

    labels = array("b")
    times = array("d")
    cols = {c: _Column(keep_codes=c in text_sources or c == retailer_col) for c in stored}
    n = 0
    unparsed = 0
    for frame in chunks:
        k = len(frame)
        y_col = frame[label_col]
        y_text = y_col.astype(object).where(y_col.notna(), "").astype(str).str.strip()
        y_missing = y_text.isin(_MISSING_LIST).to_numpy()
        lower = y_text.str.lower()
        is_true = lower.isin(list(TRUE)).to_numpy()
        is_false = lower.isin(list(FALSE)).to_numpy()
        wrong = ~(y_missing | is_true | is_false)
        if wrong.any():
            found = list(dict.fromkeys(lower[wrong].tolist()))[:5]
            raise DataError(
                f"label column {label_col!r} is not binary: found {', '.join(map(repr, found))}"
                " (expected 0/1, true/false or yes/no)"
            )
        labels.frombytes(np.where(y_missing, -1, is_true).astype(np.int8).tobytes())
        if time_col is not None:
            tc = frame[time_col]
            if tc.dtype.kind in "iuf":
                t = tc.to_numpy(np.float64, copy=True, na_value=_NAN)
            else:
                t = _times(tc.astype(object).where(tc.notna(), "").astype(str).str.strip())
            unparsed += int(np.isnan(t).sum())
            times.frombytes(t.tobytes())
        for c in stored:
            cols[c].add(frame[c] if c in frame else pd.Series([None] * k, dtype=object))
        n += k
    y_all = np.frombuffer(labels, dtype=np.int8) if n else np.zeros(0, np.int8)
    keep = np.flatnonzero(y_all >= 0)
    skipped = n - keep.size
    if not keep.size:
        raise DataError(f"label column {label_col!r} has no values")
    if skipped:
        plan.notes.append(f"skipped {skipped} rows without a label")

    if time_col is not None and unparsed > n // 2:
        if time is not None:
            raise DataError(f"time column {time_col!r} is not numbers or ISO 8601 timestamps")
        plan.notes.append(f"column {time_col!r} is not a time; using file order")
        plan.time = time_col = None
    if time_col is None:
        t_keep = np.arange(keep.size, dtype=np.float64)
    else:
        t_all = np.frombuffer(times, dtype=np.float64)[keep]
        # a missing time is the previous row's (file order), as if it arrived right after
        valid = ~np.isnan(t_all)
        idx = np.where(valid, np.arange(t_all.size), 0)
        np.maximum.accumulate(idx, out=idx)
        t_keep = np.where(valid[idx], t_all[idx], 0.0)
    by_time = np.argsort(t_keep, kind="stable")
    order = keep[by_time]
    t_sorted = t_keep[by_time]

    for c in stored:
        if c != retailer_col:
            _profile(plan, c, cols[c], keep.size, order)

    if retailer_col is None:
        retailers = [ALL_RETAILERS] * keep.size
    else:
        rc = cols[retailer_col]
        if modulo is not None:
            f = np.frombuffer(rc.floats, dtype=np.float64)[order]
            ok = ~np.isnan(f)
            names = np.where(ok, np.mod(np.nan_to_num(f), modulo), -1).astype(np.int64)
            label_of = {k: f"{retailer_col}%{modulo}={k}" for k in range(modulo)}
            retailers = [label_of.get(k, "?") for k in names.tolist()]  # one str per retailer
            plan.notes.append(f"retailer = {retailer_col} % {modulo}")
        else:
            texts = rc.texts()
            codes = np.frombuffer(rc.codes or array("i"), dtype=np.int32)[order]
            retailers = [texts[k] if k >= 0 else "?" for k in codes.tolist()]
    # the file-order labels of kept rows, in time order
    y_sorted = y_all[order].astype(bool)
    keep_cols = set(plan.numeric) | set(plan.one_hot) | set(plan.frequency) | mapped_sources
    return Prepared(plan, t_sorted, y_sorted, retailers,
                    {c: col for c, col in cols.items() if c in keep_cols}, order, int(skipped))


def _chain(head: list[Mapping[str, Any]], rest: Iterator[Mapping[str, Any]]
           ) -> Iterator[Mapping[str, Any]]:
    yield from head
    yield from rest


def _profile(plan: ColumnPlan, c: str, col: _Column, n: int, order: np.ndarray) -> None:
    """Decide how column ``c`` is used (numeric, one-hot, frequency or ignored)."""
    floats = np.frombuffer(col.floats, dtype=np.float64)[order]
    if col.codes is not None:
        codes = np.frombuffer(col.codes, dtype=np.int32)[order]
        present = int((codes >= 0).sum())
    else:
        codes = None
        present = col.present  # rows without a label are few; counts of all rows
    if not present:
        plan.ignored.append(c)
        return
    numbers = floats[~np.isnan(floats)]
    numeric_share = numbers.size / present
    if numeric_share >= 0.95:  # distinct numbers: "0" and "0.0" are one value, as parsed
        distinct = int(np.unique(numbers).size)
    elif codes is not None:
        distinct = int(np.unique(codes[codes >= 0]).size)
    else:
        distinct = MAX_TEXT_CODES + 1
    if distinct <= 1 and present == n:
        plan.ignored.append(c)
    elif numeric_share >= 0.95:
        ints = bool(np.all(numbers == np.floor(numbers)))
        if ints and distinct == present and distinct > 100 and np.unique(numbers).size == present:
            plan.ignored.append(c)  # a running number: an ID
        else:
            plan.numeric.append(c)
            if present < n:
                plan.numeric_missing.append(c)
    elif codes is None:
        plan.ignored.append(c)  # more distinct texts than we keep: identifiers, free text
    elif distinct <= MAX_ONE_HOT:
        texts = col.texts()
        plan.one_hot[c] = sorted({texts[k] for k in np.unique(codes[codes >= 0]).tolist()})
    elif distinct > 0.5 * present and distinct > 100:
        plan.ignored.append(c)  # identifiers, free text
    else:
        plan.frequency.append(c)


@dataclass(slots=True)
class Options:
    """How :func:`evaluate` runs: the label delay of the label-history features, whether River's
    baseline runs beside the default model, and which feature families the default model gets
    (the switches exist for ablations)."""

    label_delay: float = 0.0
    baseline: str | None = None
    raw_columns: bool = False
    """Give the default model the mapped source columns as profiled too (as River gets them)."""
    raw_amount: bool = True
    """Give the default model the raw amount beside ``amount_log``."""
    streaming: bool = True
    """The streaming entity features (windows, novelty); off: only the profiled columns."""
    label_history: bool = True
    frequency: bool = True
    """The frequency encoding of the higher-cardinality categorical columns."""
    river_vectors: bool = False
    """Build River's vectors even without the baseline (for :func:`vectors`)."""
    river_model: Sequence[Mapping[str, Any]] | None = None
    """A River spec (:mod:`fraud.models.river_spec`) run instead of the default model."""


@dataclass(slots=True)
class _Row:
    t: float
    y: bool
    retailer: str
    numeric: list[float]
    codes: list[int]
    amount: float
    entities: tuple[str | None, str | None, str | None, str | None]
    channel: str
    coupon: str | None
    items: int
    mismatch: bool


class _Decoder:
    """Reads the prepared columns back row by row, a chunk of rows at a time."""

    def __init__(self, data: Prepared, raw_columns: bool) -> None:
        plan = data.plan
        self.data = data
        sources = set(plan.mapping.values())
        cols = data.columns
        self.floats = [np.frombuffer(cols[c].floats, dtype=np.float64) for c in plan.numeric]
        cat_cols = [*plan.one_hot, *plan.frequency]
        self.code_arrays = [np.frombuffer(cols[c].codes or array("i"), dtype=np.int32)
                            for c in cat_cols]
        self.texts = [cols[c].texts() for c in cat_cols]
        # positions (in the numeric / categorical lists) of what our model sees
        self.ours_numeric = [i for i, c in enumerate(plan.numeric)
                             if raw_columns or c not in sources]
        self.ours_missing = [i for i in self.ours_numeric if plan.numeric[i] in
                             set(plan.numeric_missing)]
        self.ours_one_hot = [i for i, c in enumerate(plan.one_hot)
                             if raw_columns or c not in sources]
        self.ours_frequency = [len(plan.one_hot) + i for i, c in enumerate(plan.frequency)
                               if raw_columns or c not in sources]
        m = plan.mapping

        def floats_of(canon: str) -> np.ndarray | None:
            return (np.frombuffer(cols[m[canon]].floats, dtype=np.float64) if canon in m
                    else None)

        def texts_of(canon: str) -> tuple[np.ndarray, list[str]] | None:
            if canon not in m:
                return None
            col = cols[m[canon]]
            return np.frombuffer(col.codes or array("i"), dtype=np.int32), col.texts()

        self.amount = floats_of("amount")
        self.items = floats_of("item_count")
        self.entity_texts = [texts_of(c) for c in ENTITY_COLUMNS]
        self.channel = texts_of("channel")
        self.coupon = texts_of("coupon_code")
        self.mismatch = texts_of("address_mismatch")

    def rows(self) -> Iterator[_Row]:
        data = self.data
        order = data.order
        times = data.times.tolist()
        labels = data.labels.tolist()
        retailers = data.retailers
        canonical = bool(data.plan.canonical)
        nan_row: list[float] = []
        for start in range(0, order.size, CHUNK):
            idx = order[start:start + CHUNK]
            k = idx.size
            numeric = (np.column_stack([f[idx] for f in self.floats]).tolist() if self.floats
                       else [nan_row] * k)
            codes = (np.column_stack([c[idx] for c in self.code_arrays]).tolist()
                     if self.code_arrays else [[]] * k)
            if canonical:
                amount = self.amount[idx].tolist() if self.amount is not None else [0.0] * k
                items = self.items[idx].tolist() if self.items is not None else [1.0] * k
                ents = [_texts(e, idx, k) for e in self.entity_texts]
                channel = _texts(self.channel, idx, k)
                coupon = _texts(self.coupon, idx, k)
                mismatch = _texts(self.mismatch, idx, k)
            for j in range(k):
                i = start + j
                if canonical:
                    a = amount[j]
                    it = items[j]
                    ch = channel[j]
                    row = _Row(times[i], labels[i], retailers[i], numeric[j], codes[j],
                               a if a == a and a > 0.0 else 0.0,
                               (ents[0][j], ents[1][j], ents[2][j], ents[3][j]),
                               ch.lower() if ch else "web", coupon[j],
                               int(it) if it == it and it >= 0 else 1, _truthy(mismatch[j]))
                else:
                    row = _Row(times[i], labels[i], retailers[i], numeric[j], codes[j], 0.0,
                               (None, None, None, None), "web", None, 1, False)
                yield row


def _texts(column: tuple[np.ndarray, list[str]] | None, idx: np.ndarray, k: int
           ) -> list[str | None]:
    if column is None:
        return [None] * k
    codes, texts = column
    return [texts[c] if c >= 0 else None for c in codes[idx].tolist()]


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in TRUE


class _Stream:
    """One model's world: feature state, label history waiting for its delay, the models."""

    def __init__(self, dec: _Decoder, params: ModelParams, options: Options) -> None:
        self.dec = dec
        self.options = options
        self.extractor = FeatureExtractor() if dec.data.plan.canonical and options.streaming \
            else None
        self.state: dict[str, Any] = {}
        self.pending: deque[tuple[float, float, str | None, str | None, str | None, bool]] = \
            deque()
        self.counts: dict[tuple[int, int], int] = {}
        self.seen_rows = 0
        self.model: RiskModel | RiverModel = model_from_config(params, options.river_model)
        self.river = _river_model() if options.baseline == "river" else None
        plan = dec.data.plan
        self.numeric_names = plan.numeric
        self.missing_names = {i: plan.numeric[i] + "__missing" for i in dec.ours_missing}
        self.one_hot = list(plan.one_hot.items())
        self.level_names = [[f"{c}={v}" for v in levels] for c, levels in self.one_hot]
        self.level_index = [{v: n for n, v in enumerate(levels)} for _, levels in self.one_hot]
        self.cat_names = [*plan.one_hot, *plan.frequency]
        self.last_x: dict[str, float] = {}
        self.last_xr: dict[str, float] | None = None

    def encode(self, row: _Row) -> tuple[dict[str, float], dict[str, float] | None]:
        """The default model's vector of ``row`` and, with a baseline, River's; this folds
        ``row`` into the feature state and queues its label for the label history."""
        x: dict[str, float] = {}
        options = self.options
        ext = self.extractor
        if ext is not None:
            pending = self.pending
            state = self.state
            while pending and pending[0][0] <= row.t:
                _, ts, c, p, d, y = pending.popleft()
                ext.learn_label(state, ts, c, p, d, y)
            c, p, d, ip = row.entities
            x = ext.extract_fields(state, row.t, row.amount, c, p, d, ip, row.channel,
                                   row.coupon, row.items, row.mismatch)
            if options.label_history:
                pending.append((row.t + options.label_delay, row.t, c, p, d, row.y))
            else:
                for k in _LABEL_NAMES:
                    del x[k]
            if options.raw_amount:
                x["amount"] = row.amount
        dec = self.dec
        numeric = row.numeric
        names = self.numeric_names
        for i in dec.ours_numeric:
            v = numeric[i]
            x[names[i]] = v if v == v else 0.0
        for i, flag in self.missing_names.items():
            x[flag] = 1.0 if numeric[i] != numeric[i] else 0.0  # NaN: absent, never 0.0
        codes = row.codes
        for n in dec.ours_one_hot:
            levels = self.level_names[n]
            texts = dec.texts[n]
            code = codes[n]
            hit = self.level_index[n].get(texts[code]) if code >= 0 else None
            for m, name in enumerate(levels):
                x[name] = 1.0 if m == hit else 0.0
        counts = self.counts
        seen_rows = self.seen_rows
        self.seen_rows = seen_rows + 1
        for n in (dec.ours_frequency if options.frequency else ()):
            key = (n, codes[n])
            seen = counts.get(key, 0)
            # the value's share of the rows so far (log): a count alone grows without end,
            # a drifting input that SGD keeps chasing
            x[self.cat_names[n] + "__freq"] = math.log((seen + 1.0) / (seen_rows + 1.0))
            counts[key] = seen + 1
        if self.river is None and not options.river_vectors:
            return x, None
        xr = {names[i]: v for i, v in enumerate(numeric) if v == v}
        for n, (c, _) in enumerate(self.one_hot):
            code = codes[n]
            if code >= 0:
                xr[f"{c}={dec.texts[n][code]}"] = 1.0
        return x, xr

    def step(self, row: _Row) -> tuple[float, float | None]:
        """Score ``row`` with each model, then learn it."""
        x, xr = self.encode(row)
        self.last_x, self.last_xr = x, xr
        model = self.model
        if isinstance(model, RiskModel):
            ours = model.score_then_learn_one(x, row.y)
        else:
            ours = model.score_one(x, observe=True)
            model.learn_one(x, row.y)
        river = self.river
        if river is None or xr is None:
            return ours, None
        p = river.predict_proba_one(xr).get(True, 0.0)
        river.learn_one(xr, row.y)
        return ours, p


def vectors(data: Prepared, options: Options | None = None
            ) -> Iterator[tuple[dict[str, float], dict[str, float]]]:
    """``(default model's vector, River baseline's vector)`` of each row in time order, as
    the ``central`` mode computes them (no model runs)."""
    options = options or Options()
    options = Options(**{**{f: getattr(options, f) for f in options.__slots__},
                         "baseline": None, "river_vectors": True})
    dec = _Decoder(data, options.raw_columns)
    stream = _Stream(dec, ModelParams(), options)
    for row in dec.rows():
        x, xr = stream.encode(row)
        assert xr is not None
        yield x, xr


_LABEL_NAMES: Final = tuple(n for n in FeatureExtractor.names if "_fraud" in n)


def _river_model() -> Any:
    from river import linear_model, preprocessing

    return preprocessing.StandardScaler() | linear_model.LogisticRegression()


ModeRunner = Callable[[Prepared, ModelParams, Options], dict[str, list[float]]]
"""``(data, params, options) -> {"ours": scores, "river": scores (with a baseline)}``."""


@dataclass(slots=True)
class Step:
    """One row just scored and learned by its retailer's models (what a :data:`StepHook` sees).

    ``model`` and ``river`` are the live models: a hook may change them in place (a federated
    round folding a global model in) before the next row is scored.
    """

    retailer: str
    model: RiskModel | RiverModel
    x: dict[str, float]
    y: bool
    river: Any | None
    xr: dict[str, float] | None


StepHook = Callable[[Step], None]


def run_streams(data: Prepared, params: ModelParams, options: Options,
                after_step: StepHook | None = None) -> dict[str, list[float]]:
    """:func:`run_local` with ``after_step`` called after each row (for a federated layer)."""
    return _run(data, params, options, True, after_step)


def _run(data: Prepared, params: ModelParams, options: Options, by_retailer: bool,
         after_step: StepHook | None = None) -> dict[str, list[float]]:
    dec = _Decoder(data, options.raw_columns)
    streams: dict[str, _Stream] = {}
    ours: list[float] = []
    river: list[float] = []
    for row in dec.rows():
        key = row.retailer if by_retailer else ALL_RETAILERS
        stream = streams.get(key)
        if stream is None:
            stream = streams[key] = _Stream(dec, params, options)
        a, b = stream.step(row)
        ours.append(a)
        if b is not None:
            river.append(b)
        if after_step is not None:
            after_step(Step(key, stream.model, stream.last_x, row.y, stream.river,
                            stream.last_xr))
    return {"ours": ours, "river": river} if options.baseline else {"ours": ours}


def run_local(data: Prepared, params: ModelParams, options: Options) -> dict[str, list[float]]:
    """Scores when each retailer trains only on its own rows."""
    return _run(data, params, options, True)


def run_central(data: Prepared, params: ModelParams, options: Options
                ) -> dict[str, list[float]]:
    """Scores of one model trained on every retailer's rows."""
    return _run(data, params, options, False)


MODES: Final[dict[str, ModeRunner]] = {"local": run_local, "central": run_central}
"""Mode name -> runner; other packages (the federated layer) may add theirs."""


def summarize(data: Prepared, scores: Sequence[float]) -> dict[str, Any]:
    """``{"overall": report, "retailers": {name: report}}`` for one mode's scores."""
    s = np.asarray(scores, dtype=np.float64)
    r = np.asarray(data.retailers)
    return {
        "overall": report(data.labels, s),
        "retailers": {name: report(data.labels[r == name], s[r == name])
                      for name in sorted(set(data.retailers))},
    }


def evaluate(
    data: Prepared, modes: Sequence[str] = ("local", "central"),
    params: ModelParams | None = None, baseline: str | None = None,
    label_delay: float = 0.0, options: Options | None = None,
    river_model: Sequence[Mapping[str, Any]] | None = None,
    runners: Mapping[str, ModeRunner] | None = None,
) -> dict[str, Any]:
    """Run each mode prequentially and report exact metrics per retailer and overall.

    ``runners`` replaces :data:`MODES` (e.g. with the federated layer's mode added).

    With ``baseline="river"`` the result also has ``"<mode>/river"`` entries: River's
    ``StandardScaler | LogisticRegression`` on the same rows in the same order.
    ``river_model`` (a River spec, :mod:`fraud.models.river_spec`) runs instead of the
    default model.
    """
    params = params or ModelParams()
    if options is None:
        options = Options(label_delay=label_delay, baseline=baseline)
    if river_model is not None:
        options = replace(options, river_model=river_model)
    if options.baseline not in (None, "river"):
        raise DataError(f"unknown baseline {options.baseline!r}; the only one is 'river'")
    out: dict[str, Any] = {}
    available = MODES if runners is None else runners
    for mode in modes:
        runner = available.get(mode)
        if runner is None:
            raise DataError(f"unknown mode {mode!r}; choose from {', '.join(available)}")
        scores = runner(data, params, options)
        out[mode] = summarize(data, scores["ours"])
        if "river" in scores:
            out[f"{mode}/river"] = summarize(data, scores["river"])
    return out


