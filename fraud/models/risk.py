"""The default risk model: scaling + logistic regression, blended with a local anomaly score.

Three parts, all plain data:

* ``scaler``: a :class:`~fraud.models.scaler.RunningScaler` updated on labelled events;
* ``linear``: logistic-regression weights trained by SGD on the scaled features, positives
  up-weighted by the running negative/positive ratio (capped at ``max_pos_weight``); two heads
  on the one scaler, one over every feature and one over the raw numeric inputs alone
  (:func:`is_raw_input`), and the model scores with the one whose recent scores rank the
  labels better (over the last ``head_window`` labels, paired per fraud, by a clear margin);
* ``anomaly``: per-feature running mean/variance of the traffic the model is shown with the
  explicit unsupervised step :meth:`RiskModel.learn_unsupervised_one` (the worker shows it every
  event it scores, labelled or not); the anomaly score is the mean clipped squared z-score,
  squashed to [0, 1). A retailer with no labels still gets a useful score from it.

``score = alpha * p_supervised + (1 - alpha) * anomaly`` with
``alpha = (1 - anomaly_weight) * n_pos / (n_pos + warmup_positives)``: the supervised part takes
over as fraud labels arrive.

:class:`RiskModel` is a River classifier (``river.base.Classifier``): flat hyper-parameters,
``learn_one(x, y, w)``, ``predict_proba_one(x)`` without side effects; it runs inside
``compose.Pipeline`` and ``evaluate.progressive_val_score`` and passes ``river.checks``. Like
River's anomaly detectors, scoring learns nothing: ``score = predict, then learn`` is the
caller's choice (:meth:`RiskModel.score_and_explain_many` with ``observe=True`` fuses the two
for the worker's batches, with the same result).

Federation: ``scaler`` and ``linear`` are shared (:func:`merge_states`,
:meth:`RiskModel.load_shared`, :meth:`RiskModel.export_delta`); the anomaly statistics stay
local to the worker (they describe that retailer's normal traffic) but are exported with the
full state, so a restarted worker restores them.

>>> model = RiskModel()
>>> normal = {"amount_log": 3.0, "customer_n_1h": 1.0}
>>> for i in range(200):
...     x = {"amount_log": 3.0 + (i % 7) / 10, "customer_n_1h": float(i % 3)}
...     model.learn_one(x, False)
...     model.learn_unsupervised_one(x)
...     if i % 20 == 0:
...         y = {"amount_log": 8.0, "customer_n_1h": 9.0}
...         model.learn_one(y, True)
...         model.learn_unsupervised_one(y)
>>> model.score_one({"amount_log": 8.5, "customer_n_1h": 8.0}) > 0.8 > model.score_one(normal)
True
>>> clone = RiskModel.from_state(json.loads(json.dumps(model.export_state())))
>>> clone.predict_proba_one(normal) == model.predict_proba_one(normal)
True
>>> sorted(name for name, _ in model.contributions({"amount_log": 8.5, "customer_n_1h": 8.0}))
['amount_log', 'customer_n_1h']
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

import numpy as np
from river import base

from fraud.features import FEATURE_NAMES
from fraud.models.kernels import (
    head_evidence,
    learn_rows,
    score_matrix,
    score_rows,
    top_positive,
)
from fraud.models.linear import empty_linear, merge_linear
from fraud.models.scaler import RunningScaler, merge_scalers, subtract_scaler
from fraud.schema import SchemaError

MODEL_STATE_VERSION: Final = 1
MODEL_KIND: Final = "risk_model"


@dataclass(frozen=True, slots=True)
class ModelParams:
    """Hyper-parameters of :class:`RiskModel`; plain data via ``to_dict``/``from_dict``."""

    learning_rate: float = 0.01
    l2: float = 0.0
    clip: float = 6.0
    max_pos_weight: float = 1.0
    anomaly_weight: float = 0.0
    warmup_positives: float = 0.0
    anomaly_scale: float = 3.0
    anomaly_min_events: int = 30
    head_window: int = 5000

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ModelParams:
        """Validate; unknown keys are an error naming them."""
        if not d:
            return cls()
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in d.items():
            if key not in known:
                raise SchemaError(f"params.{key}", "unknown model parameter")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SchemaError(f"params.{key}", f"expected a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise SchemaError(f"params.{key}", f"must be finite and >= 0, got {value!r}")
            values[key] = int(value) if key in _INT_PARAMS else float(value)
        if not 0.0 <= values.get("anomaly_weight", 0.0) <= 1.0:
            raise SchemaError("params.anomaly_weight", "must be in [0, 1]")
        return cls(**values)


_INT_PARAMS: Final = frozenset(("anomaly_min_events", "head_window"))
_DERIVED: Final = frozenset(FEATURE_NAMES)
HEAD_CHECKS: Final = 50
"""The head choice is checked every ``head_window / HEAD_CHECKS`` labels."""
HEAD_RANK_EVIDENCE: Final = 2.0
"""Standard errors by which a head must rank the window's frauds better to be chosen."""
HEAD_PRECISION_EVIDENCE: Final = 5.0
"""Standard errors by which the raw head's precision at the window's frauds must be the
higher for it to be kept whatever the ranking says."""
FULL, RAW = 4, 5
"""Columns of the scaler table holding each linear head's weights."""
_RAW_FLAG: Final = 6


def is_raw_input(name: str) -> bool:
    """Whether a feature is a raw numeric input (a column as given, e.g. ``amount``) rather
    than one we derived: the streaming features of :mod:`fraud.features`, one-hot levels
    (``col=value``), missing flags and frequency encodings (``col__missing``, ``col__freq``).

    >>> [is_raw_input(k) for k in ("amount", "lat", "amount_log", "country=FR", "c__freq")]
    [True, True, False, False, False]
    """
    return name not in _DERIVED and "=" not in name and "__" not in name


_exp = math.exp
_NO_CONTRIBUTIONS = np.empty(0)


def _by_contribution(term: tuple[str, float]) -> tuple[float, str]:
    return -term[1], term[0]


def _sigmoid(s: float) -> float:
    if s < -35.0:
        return 6.305116760146989e-16
    if s > 35.0:
        return 1.0 - 6.305116760146989e-16
    return 1.0 / (1.0 + math.exp(-s))


class _StatsTable:
    """Per-feature statistics records as the rows of one float64 array, by feature name.

    Rows are allocated in the order features are first seen (the order they are exported
    in) and never move or go away; a new row is all zeros until the compiled loop fills it.
    """

    __slots__ = ("data", "flag_raw", "index", "n_raw", "names", "width")

    def __init__(self, width: int, capacity: int = 64) -> None:
        self.width = width
        # the scaler table flags raw-input rows (column 6) for the raw head; counts them
        self.flag_raw = width > _RAW_FLAG
        self.n_raw = 0
        self.data = np.zeros((capacity, width))
        self.index: dict[str, int] = {}
        self.names: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def add(self, key: str, record: Sequence[float] | None = None) -> int:
        row = len(self.names)
        if row == self.data.shape[0]:
            grown = np.zeros((2 * row, self.width))
            grown[:row] = self.data
            self.data = grown
        self.index[key] = row
        self.names.append(key)
        if record is not None:
            self.data[row] = record
        if self.flag_raw and is_raw_input(key):
            self.data[row, _RAW_FLAG] = 1.0
            self.n_raw += 1
        return row

    def rows(self, keys: Sequence[str], create: bool) -> np.ndarray:
        """The row of each key; a missing key gets a new row with ``create``, else -1."""
        get = self.index.get
        if create:
            add = self.add
            return np.array([r if (r := get(k)) is not None else add(k) for k in keys],
                            dtype=np.int64)
        return np.array([get(k, -1) for k in keys], dtype=np.int64)

    def records(self) -> list[tuple[str, list[float]]]:
        return list(zip(self.names, self.data[:len(self.names)].tolist(), strict=True))

    def scaler(self, clip: float) -> RunningScaler:
        """A snapshot of the ``[count, mean, m2, 1/std]`` columns as a :class:`RunningScaler`."""
        out = RunningScaler(clip)
        out.stats = {k: r[:4] for k, r in self.records()}
        return out

    @classmethod
    def from_scaler(cls, scaler: RunningScaler, width: int) -> _StatsTable:
        table = cls(width, max(64, len(scaler.stats)))
        pad = [0.0] * (width - 4)
        for k, s in scaler.stats.items():
            table.add(k, [*s[:4], *pad])
        return table


class _Rows:
    """The rows of one key order in both tables; valid while neither table grows."""

    __slots__ = ("_ranks", "afull", "alen", "arows", "keys", "sfull", "slen", "srows")

    def __init__(self, keys: tuple[str, ...], srows: np.ndarray, arows: np.ndarray,
                 slen: int, alen: int) -> None:
        self.keys, self.srows, self.arows, self.slen, self.alen = keys, srows, arows, slen, alen
        self.sfull = not srows.size or srows.min() >= 0
        self.afull = not arows.size or arows.min() >= 0
        self._ranks: np.ndarray | None = None

    @property
    def ranks(self) -> np.ndarray:
        """Each key's place in sorted order: how equal contributions are ordered."""
        if self._ranks is None:
            keys = self.keys
            ranks = np.empty(len(keys), dtype=np.int64)
            ranks[sorted(range(len(keys)), key=keys.__getitem__)] = np.arange(len(keys))
            self._ranks = ranks
        return self._ranks


class RiskModel(base.Classifier):
    """Online fraud-risk model: a River binary classifier over ``dict[str, float]`` vectors.

    Keys absent from a vector contribute nothing, so a vector stored at scoring time can be
    passed to ``learn_one`` when its label arrives. Scoring (``predict_proba_one``,
    ``score_one``) learns nothing; the anomaly statistics learn only in the explicit
    unsupervised step :meth:`learn_unsupervised_one` (or ``observe=True`` on the batch path).

    The statistics live in float64 tables walked by compiled loops
    (:mod:`fraud.models.kernels`); the rows of a key order that keeps repeating (what
    :class:`~fraud.features.FeatureExtractor` produces) are looked up once.

    Parameters
    ----------
    learning_rate
        SGD step of the logistic regression.
    l2
        L2 penalty (weight decay ``1 - learning_rate * l2`` per step).
    clip
        z-scores are clipped to ``[-clip, clip]``.
    max_pos_weight
        Cap of the up-weighting of positives (the running negative/positive ratio).
    anomaly_weight
        Share of the score the anomaly part keeps once many positives have been seen.
    warmup_positives
        Positives at which the supervised part has half its final share.
    anomaly_scale
        Squashing constant of the anomaly score ``m / (m + anomaly_scale)``.
    anomaly_min_events
        Unlabelled events the anomaly part needs before it scores.
    head_window
        Labelled events over which the two linear heads are compared (0: the full head
        only). Both heads learn every label on the same scaler: the *full* head on every
        feature, the *raw* head on the raw numeric inputs alone (:func:`is_raw_input`). The
        model starts with the raw head (the simpler model) once it has a raw input; every
        ``head_window / 50`` labels it compares both heads' scores of the last
        ``head_window`` labels (each scored just before it was learned), paired per fraud:
        it takes the full head when that ranks the frauds above fewer legitimate rows by more
        than two standard errors, unless the raw head's precision at the frauds (the terms
        of average precision) is the higher by more than five; the raw head when it wins
        either test. Derived features can cost average precision where the raw inputs carry
        the signal (``fraud/models/README.md``): the choice is measured, not assumed.
    """

    def __init__(
        self,
        learning_rate: float = 0.01,
        l2: float = 0.0,
        clip: float = 6.0,
        max_pos_weight: float = 1.0,
        anomaly_weight: float = 0.0,
        warmup_positives: float = 0.0,
        anomaly_scale: float = 3.0,
        anomaly_min_events: int = 30,
        head_window: int = 5000,
    ) -> None:
        checked = ModelParams.from_dict({
            "learning_rate": learning_rate, "l2": l2, "clip": clip,
            "max_pos_weight": max_pos_weight, "anomaly_weight": anomaly_weight,
            "warmup_positives": warmup_positives, "anomaly_scale": anomaly_scale,
            "anomaly_min_events": anomaly_min_events, "head_window": head_window})
        self.learning_rate = checked.learning_rate
        self.l2 = checked.l2
        self.clip = checked.clip
        self.max_pos_weight = checked.max_pos_weight
        self.anomaly_weight = checked.anomaly_weight
        self.warmup_positives = checked.warmup_positives
        self.anomaly_scale = checked.anomaly_scale
        self.anomaly_min_events = checked.anomaly_min_events
        self.head_window = checked.head_window
        self.version = "local"
        # supervised scaler and both heads' weights:
        # [count, mean, m2, 1/std, weight, raw weight, is raw] per feature
        self._scaler = _StatsTable(7)
        # local anomaly statistics: [count, mean, m2, 1/std] per feature
        self._anomaly = _StatsTable(4)
        self.anomaly_seen = 0
        self.intercept = 0.0
        self.raw_intercept = 0.0
        self.head = "raw"
        # the head choice's window: both heads' scores of the last labels, and the labels
        self._window_dots = np.zeros((2, 0))
        self._window_labels = np.zeros(0, dtype=np.bool_)
        self._window_n = 0
        self.n = 0
        self.n_pos = 0
        self.n_neg = 0
        # the shared part of the last global model loaded (load_shared): what export_delta
        # leaves out; None: everything this model knows is its own
        self._base: dict[str, Any] | None = None
        self._rows: _Rows | None = None

    @classmethod
    def from_params(cls, params: ModelParams | Mapping[str, Any] | None = None) -> RiskModel:
        """A new model with ``params`` (the plain-data form the live config carries)."""
        if params is None:
            return cls()
        if isinstance(params, Mapping):
            params = ModelParams.from_dict(params)
        return cls(**params.to_dict())  # type: ignore[arg-type]

    @classmethod
    def warm_up(cls) -> None:
        """Load every compiled loop now (numba's on-disk cache, or a compile): the first call
        of each loads it, about a second on the 2-core machines, and a worker's first batch
        waited for that while its input queued. Scores, explains and learns a two-feature
        throwaway model, with the argument types the model's own calls use."""
        model = cls(head_window=2)  # a window this small chooses its head at every label
        x = {"amount": 1.0, "amount_log": 0.5}  # a raw input and a derived one: both heads
        model.score_and_explain_many(tuple(x), np.array([list(x.values())]), 3, observe=True)
        model.score_one(x)
        model.contributions(x)
        for y in (True, False, True):
            model.learn_one(x, y)

    @property
    def params(self) -> ModelParams:
        """The hyper-parameters as plain data."""
        return ModelParams(self.learning_rate, self.l2, self.clip, self.max_pos_weight,
                           self.anomaly_weight, self.warmup_positives, self.anomaly_scale,
                           self.anomaly_min_events, self.head_window)

    @params.setter
    def params(self, params: ModelParams) -> None:
        """Adopt new hyper-parameters (a config change); the learned state stays."""
        for name, value in params.to_dict().items():
            setattr(self, name, value)

    @classmethod
    def _unit_test_params(cls) -> Iterator[dict[str, Any]]:
        yield {}
        yield {"learning_rate": 0.1, "l2": 0.01, "anomaly_min_events": 0, "head_window": 20}

    @property
    def weights(self) -> dict[str, float]:
        """The full head's linear weights by feature."""
        return {k: r[FULL] for k, r in self._scaler.records()}

    @property
    def raw_weights(self) -> dict[str, float]:
        """The raw head's linear weights by raw-input feature."""
        return {k: r[RAW] for k, r in self._scaler.records() if r[_RAW_FLAG]}

    def _head(self) -> tuple[int, float]:
        """``(weight column, intercept)`` of the head that scores."""
        if self.head == "raw" and self.head_window and self._scaler.n_raw:
            return RAW, self.raw_intercept
        return FULL, self.intercept

    @property
    def scaler(self) -> RunningScaler:
        """A snapshot of the supervised scaler's statistics."""
        return self._scaler.scaler(self.clip)

    @property
    def anomaly(self) -> RunningScaler:
        """A snapshot of the local anomaly statistics."""
        return self._anomaly.scaler(self.clip)

    def _rows_for(self, keys: tuple[str, ...], learn: bool, observe: bool) -> _Rows:
        """Rows of ``keys``; allocates scaler rows to ``learn`` and anomaly rows to ``observe``."""
        sc, an = self._scaler, self._anomaly
        rows = self._rows
        if (rows is None or rows.keys != keys or rows.slen != len(sc) or rows.alen != len(an)
                or (learn and not rows.sfull) or (observe and not rows.afull)):
            srows = sc.rows(keys, learn)
            arows = an.rows(keys, observe)
            rows = self._rows = _Rows(keys, srows, arows, len(sc), len(an))
        return rows

    # -- scoring ---------------------------------------------------------------------------
    def _run(self, x: Mapping[str, float], observe: bool,
             contributions: np.ndarray = _NO_CONTRIBUTIONS) -> tuple[float, float, _Rows]:
        """``(dot, zz, rows)`` of ``x`` as the model stands; with ``observe`` the anomaly
        statistics learn ``x`` afterwards (``anomaly_seen`` is the caller's to count)."""
        keys = tuple(x)
        rows = self._rows_for(keys, False, observe)
        values = np.fromiter(x.values(), np.float64, len(keys))
        wcol, intercept = self._head()
        dot, zz = score_rows(self._scaler.data, self._anomaly.data, rows.srows, rows.arows,
                             values, self.clip, intercept, observe, contributions, wcol)
        return dot, zz, rows

    def _blend(self, dot: float, zz: float, count: int) -> float:
        if self.anomaly_seen > self.anomaly_min_events and count:
            m = zz / count
            anomaly = m / (m + self.anomaly_scale)
        else:
            anomaly = 0.0
        n_pos = self.n_pos
        if not n_pos:
            return anomaly
        alpha = (1.0 - self.anomaly_weight) * n_pos / (n_pos + self.warmup_positives)
        if dot < -35.0:
            dot = -35.0
        elif dot > 35.0:
            dot = 35.0
        return alpha / (1.0 + _exp(-dot)) + (1.0 - alpha) * anomaly

    def score_one(self, x: Mapping[str, float], observe: bool = False) -> float:
        """Combined risk in [0, 1]; with ``observe``, :meth:`learn_unsupervised_one` after."""
        dot, zz, _ = self._run(x, observe)
        score = self._blend(dot, zz, len(x))
        if observe:
            self.anomaly_seen += 1
        return score

    def score_and_explain(
        self, x: Mapping[str, float], k: int = 3, observe: bool = False
    ) -> tuple[float, list[tuple[str, float]]]:
        """``(score_one(x, observe), contributions(x, k))`` in one pass over ``x``."""
        values = np.fromiter(x.values(), np.float64, len(x)).reshape(1, len(x))
        scores, explained = self.score_and_explain_many(tuple(x), values, k, observe)
        return scores[0], explained[0]

    def score_and_explain_many(
        self, keys: tuple[str, ...], X: np.ndarray, k: int = 3, observe: bool = False
    ) -> tuple[list[float], list[list[tuple[str, float]]]]:
        """``score_and_explain`` of each row of ``X`` (values of ``keys``, in that order), in
        order, with one compiled call for all rows: the same scores and contributions, bit for
        bit. With ``observe`` each row is scored, then learned by the anomaly statistics
        (``predict_proba_one`` then ``learn_unsupervised_one``, row after row).

        >>> model = RiskModel()
        >>> rows = np.array([[3.0, 1.0], [3.5, 0.0], [9.0, 7.0]])
        >>> twin = RiskModel()
        >>> xs = [{"a": a, "b": b} for a, b in rows.tolist()]
        >>> expected = []
        >>> for x in xs:
        ...     expected.append((twin.predict_proba_one(x)[True], twin.contributions(x, 2)))
        ...     twin.learn_unsupervised_one(x)
        >>> expected == [*zip(*model.score_and_explain_many(("a", "b"), rows, 2, observe=True))]
        True
        """
        if X.ndim != 2 or X.shape[1] != len(keys):
            raise ValueError(f"expected rows of {len(keys)} values, got shape {X.shape}")
        if not X.shape[0]:
            return [], []
        rows = self._rows_for(keys, False, observe)
        values = np.ascontiguousarray(X, dtype=np.float64)
        top = max(k, 0)
        wcol, intercept = self._head()
        dots, zzs, chosen, chosen_terms = score_matrix(
            self._scaler.data, self._anomaly.data, rows.srows, rows.arows, values,
            self.clip, intercept, observe, rows.ranks, top, wcol)
        blend = self._blend
        width = len(keys)
        scores = []
        for dot, zz in zip(dots.tolist(), zzs.tolist(), strict=True):
            scores.append(blend(dot, zz, width))
            if observe:  # the next row's score sees this row's observation
                self.anomaly_seen += 1
        if not top:  # scores only (the FL mixing record scores thousands of rows a round)
            return scores, [[] for _ in scores]
        explained = [[(keys[i], c) for i, c in zip(ids, cs, strict=True) if i >= 0]
                     for ids, cs in zip(chosen.tolist(), chosen_terms.tolist(), strict=True)]
        return scores, explained

    def score_many(self, xs: Iterable[Mapping[str, float]], observe: bool = False) -> list[float]:
        """``score_one`` for each vector, in order (:meth:`score_and_explain_many` is the
        hot path's batch form)."""
        score = self.score_one
        return [score(x, observe) for x in xs]

    def predict_proba_one(self, x: Mapping[str, float]) -> dict[bool, float]:  # type: ignore[override]
        """Class probabilities of the combined score; learns nothing."""
        p = self.score_one(x)
        return {False: 1.0 - p, True: p}

    def predict_proba_many(self, xs: Iterable[Mapping[str, float]]) -> list[float]:
        """Risk scores of many vectors; learns nothing."""
        return self.score_many(xs)

    def supervised_proba(self, x: Mapping[str, float]) -> float:
        """The logistic-regression probability alone."""
        return _sigmoid(self._head()[1] + sum(c for _, c in self._terms(x)))

    def anomaly_score(self, x: Mapping[str, float]) -> float:
        """The anomaly part alone, in [0, 1)."""
        if not x or self.anomaly_seen <= self.anomaly_min_events:
            return 0.0
        _, zz, _ = self._run(x, False)
        m = zz / len(x)
        return m / (m + self.anomaly_scale)

    def _terms(self, x: Mapping[str, float]) -> list[tuple[str, float]]:
        """``(feature, weight * z)`` of every feature of ``x`` the scaler has, in order."""
        terms = np.empty(len(x))
        self._run(x, False, terms)
        return [(k, c) for k, c in zip(x, terms.tolist(), strict=True) if c == c]

    def contributions(self, x: Mapping[str, float], k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` largest positive terms ``weight * z`` of the linear model, largest first."""
        terms = np.empty(len(x))
        _, _, rows = self._run(x, False, terms)
        return _top(rows, terms, k)

    # -- learning --------------------------------------------------------------------------
    def learn_unsupervised_one(self, x: Mapping[str, float]) -> None:
        """The unsupervised step: only the anomaly statistics learn ``x`` (any traffic,
        labelled or not; the worker calls it for every event it scores)."""
        self._run(x, True)
        self.anomaly_seen += 1

    def learn_one(  # type: ignore[override]
        self, x: Mapping[str, float], y: bool | int | float, w: float = 1.0
    ) -> None:
        """One SGD step on ``(x, y)`` with sample weight ``w``, after updating the scaler
        with ``x``. Positives are also up-weighted by the running negative/positive ratio."""
        keys = tuple(x)
        self._learn(keys, np.fromiter(x.values(), np.float64, len(keys)), y, w)

    def score_then_learn_one(self, x: Mapping[str, float], y: bool | int | float) -> float:
        """The prequential step: ``score_one(x, observe=True)``, then ``learn_one(x, y)``,
        with the same results bit for bit; the vector is read once."""
        keys = tuple(x)
        values = np.fromiter(x.values(), np.float64, len(keys))
        rows = self._rows_for(keys, False, True)
        wcol, intercept = self._head()
        dot, zz = score_rows(self._scaler.data, self._anomaly.data, rows.srows, rows.arows,
                             values, self.clip, intercept, True, _NO_CONTRIBUTIONS, wcol)
        score = self._blend(dot, zz, len(keys))
        self.anomaly_seen += 1
        self._learn(keys, values, y, 1.0)
        return score

    def _learn(self, keys: tuple[str, ...], values: np.ndarray, y: bool | int | float,
               w: float) -> None:
        rows = self._rows_for(keys, True, False)
        weight = 1.0
        if y:
            weight = (self.n_neg + 1.0) / (self.n_pos + 1.0)
            if weight > self.max_pos_weight:
                weight = self.max_pos_weight
            elif weight < 1.0:
                weight = 1.0
            self.n_pos += 1
        else:
            self.n_neg += 1
        self.n += 1
        if w != 1.0:
            weight *= w
        rate = self.learning_rate
        # no raw input yet: nothing to choose between, the window waits
        size = self.head_window if self._scaler.n_raw else 0
        slot = -1
        if size:
            if self._window_labels.size != size:
                self._resize_window(size)
            slot = self._window_n % size
        step, raw_step = learn_rows(
            self._scaler.data, rows.srows, values, self.clip, self.intercept,
            self.raw_intercept, bool(y), weight, rate, 1.0 - rate * self.l2,
            self._window_dots, self._window_labels, slot)
        self.intercept -= step
        if self.head_window:
            self.raw_intercept -= raw_step
        if size:
            n = self._window_n = self._window_n + 1
            if not n % max(size // HEAD_CHECKS, 1):
                self._choose_head()

    def _choose_head(self) -> None:
        """Choose the head from both heads' scores of the last ``head_window`` labels (each
        scored just before it was learned; the learning step records them), paired per fraud:
        the raw head when its precision at the frauds is the higher by more than
        :data:`HEAD_PRECISION_EVIDENCE` standard errors or it ranks them above fewer
        legitimate rows by more than :data:`HEAD_RANK_EVIDENCE`; else the full head when it
        ranks them better by that much; else no change."""
        kept = min(self._window_n, self.head_window)
        rank_z, precision_z = head_evidence(self._window_dots[0, :kept],
                                            self._window_dots[1, :kept],
                                            self._window_labels[:kept])
        if precision_z < -HEAD_PRECISION_EVIDENCE or rank_z < -HEAD_RANK_EVIDENCE:
            self.head = "raw"
        elif rank_z > HEAD_RANK_EVIDENCE:
            self.head = "full"

    def _resize_window(self, size: int) -> None:
        """A new window size (a config change): keep the most recent labels that fit."""
        old = self._window_labels.size
        kept = min(self._window_n, old, size)
        order = [(self._window_n - kept + j) % old for j in range(kept)] if old else []
        dots = np.zeros((2, size))
        labels = np.zeros(size, dtype=np.bool_)
        dots[:, :kept] = self._window_dots[:, order]
        labels[:kept] = self._window_labels[order]
        self._window_dots, self._window_labels, self._window_n = dots, labels, kept

    def learn_many(
        self, xs: Sequence[Mapping[str, float]], ys: Sequence[bool | int | float]
    ) -> None:
        """``learn_one`` for each pair, in order."""
        if len(xs) != len(ys):
            raise ValueError(f"learn_many: {len(xs)} vectors but {len(ys)} labels")
        learn = self.learn_one
        for x, y in zip(xs, ys, strict=True):
            learn(x, y)

    # -- plain-data state ------------------------------------------------------------------
    def export_shared(self) -> dict[str, Any]:
        """The federated part (scaler + linear heads) as versioned plain data, no anomaly
        stats and no head choice (local: it is measured on this party's labels)."""
        state = {
            "v": MODEL_STATE_VERSION,
            "kind": MODEL_KIND,
            "version": self.version,
            "params": self.params.to_dict(),
            "scaler": self.scaler.to_dict(),
            "linear": {
                "weights": self.weights,
                "intercept": self.intercept,
                "n": self.n,
                "n_pos": self.n_pos,
                "n_neg": self.n_neg,
            },
            "anomaly": None,
        }
        if self.head_window:
            state["raw_linear"] = {"weights": self.raw_weights, "intercept": self.raw_intercept}
        return state

    def export_state(self) -> dict[str, Any]:
        """Everything, as versioned plain data (JSON- and msgpack-safe); never pickle.

        ``base`` is the shared part of the last global model loaded (``None`` if none), so a
        restarted worker still knows which of its statistics are its own
        (:meth:`export_delta`).
        """
        state = self.export_shared()
        state["anomaly"] = self.anomaly.to_dict()
        state["base"] = self._base
        if self.head_window:
            kept = min(self._window_n, self._window_labels.size)
            state["head"] = {"head": self.head, "n": self._window_n,
                             "full": self._window_dots[0, :kept].tolist(),
                             "raw": self._window_dots[1, :kept].tolist(),
                             "labels": self._window_labels[:kept].tolist()}
        return state

    def export_delta(self) -> dict[str, Any]:
        """What this model learned since its last :meth:`load_shared`, for a federated round.

        A shared state (mergeable with :func:`merge_states`) whose counts and scaler
        statistics cover only the labels learned since the global model was loaded, and whose
        weights are the current ones; ``delta_of`` names that global model. Merging the global
        model with the deltas of its clients counts every label once. Without a global model
        the delta is the whole shared part.
        """
        state = self.export_shared()
        state["delta_of"] = None
        base = self._base
        if base is None:
            return state
        state["delta_of"] = base["version"]
        state["scaler"] = subtract_scaler(state["scaler"], base["scaler"])
        linear = state["linear"]
        for key in ("n", "n_pos", "n_neg"):
            linear[key] -= base[key]
        return state

    def load_shared(self, state: Mapping[str, Any]) -> None:
        """Replace scaler + linear by ``state``'s (e.g. a new global model); keep local anomaly.

        ``state`` becomes the base: :meth:`export_delta` leaves its counts and statistics out.
        """
        other = RiskModel.from_state(state)
        self.version = other.version
        self._scaler = other._scaler
        self._rows = None
        self.intercept = other.intercept
        self.raw_intercept = other.raw_intercept
        self.n, self.n_pos, self.n_neg = other.n, other.n_pos, other.n_neg
        self._base = {"version": other.version, "n": other.n, "n_pos": other.n_pos,
                      "n_neg": other.n_neg, "scaler": other.scaler.to_dict()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RiskModel:
        """Rebuild from :meth:`export_state` data; raises ``SchemaError`` naming a bad field."""
        _check_state(state)
        params = ModelParams.from_dict(state.get("params"))
        model = cls.from_params(params)
        model.version = str(state.get("version", ""))
        clip = params.clip
        try:
            scaler = RunningScaler.from_dict(state["scaler"], clip)
            linear = state["linear"]
            weights = {str(k): float(v) for k, v in linear["weights"].items()}
            model.intercept = float(linear["intercept"])
            model.n = int(linear["n"])
            model.n_pos = int(linear["n_pos"])
            model.n_neg = int(linear["n_neg"])
            if state.get("anomaly"):
                anomaly = RunningScaler.from_dict(state["anomaly"], clip)
                model._anomaly = _StatsTable.from_scaler(anomaly, 4)
                counts = state["anomaly"]["counts"].values()
                model.anomaly_seen = int(max(counts, default=0))
            base = state.get("base")
            if base is not None:
                model._base = {
                    "version": str(base["version"]), "n": int(base["n"]),
                    "n_pos": int(base["n_pos"]), "n_neg": int(base["n_neg"]),
                    "scaler": {part: {str(k): float(v) for k, v in base["scaler"][part].items()}
                               for part in ("counts", "means", "vars")}}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SchemaError("model", f"malformed model state: {exc!r}") from None
        stats = scaler.stats
        for k in weights:
            if k not in stats:
                stats[k] = [1.0, 0.0, 0.0, 0.0]
        table = model._scaler = _StatsTable.from_scaler(scaler, 7)
        for k, w in weights.items():
            table.data[table.index[k], FULL] = w
        if model.head_window:
            _load_heads(model, state)
        return model

    def to_json(self) -> bytes:
        return json.dumps(self.export_state(), separators=(",", ":")).encode()


def _load_heads(model: RiskModel, state: Mapping[str, Any]) -> None:
    """The raw head's weights and the local head choice of ``state`` (absent: a model saved
    before the raw head existed starts it at zero)."""
    table = model._scaler
    try:
        raw = state.get("raw_linear")
        if raw is not None:
            model.raw_intercept = float(raw["intercept"])
            for k, w in raw["weights"].items():
                row = table.index.get(str(k))
                # a weight without scaler statistics (a global model that lacks the feature)
                # could never score: it is left out, as the feature is
                if row is not None and table.data[row, _RAW_FLAG]:
                    table.data[row, RAW] = float(w)
        head = state.get("head")
        if head is not None:
            if head["head"] not in ("raw", "full"):
                raise ValueError(f"unknown head {head['head']!r}")
            model.head = head["head"]
            size = model.head_window
            labels = [bool(v) for v in head["labels"]]
            full = [float(v) for v in head["full"]]
            raw_dots = [float(v) for v in head["raw"]]
            n = int(head["n"])
            if not len(labels) == len(full) == len(raw_dots) == min(n, size):
                raise ValueError("head window of the wrong length")
            model._window_dots = np.zeros((2, size))
            model._window_labels = np.zeros(size, dtype=np.bool_)
            model._window_dots[0, :len(full)] = full
            model._window_dots[1, :len(raw_dots)] = raw_dots
            model._window_labels[:len(labels)] = labels
            model._window_n = n
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SchemaError("model", f"malformed model state: {exc!r}") from None


def _top(rows: _Rows, terms: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The ``k`` largest positive ``(key, term)`` pairs, largest first (ties by key)."""
    if k <= 0:
        return []
    keys = rows.keys  # the k chosen floats out of the array, not all ~50 (terms.tolist())
    return [(keys[i], float(terms[i])) for i in top_positive(terms, rows.ranks, k).tolist()
            if i >= 0]


def _check_state(state: Any) -> None:
    if not isinstance(state, Mapping):
        raise SchemaError("model", f"expected an object, got {type(state).__name__}")
    if state.get("v") != MODEL_STATE_VERSION:
        raise SchemaError("v", f"unsupported model state version {state.get('v')!r}")
    if state.get("kind") != MODEL_KIND:
        raise SchemaError("kind", f"expected {MODEL_KIND!r}, got {state.get('kind')!r}")
    for part in ("scaler", "linear"):
        if not isinstance(state.get(part), Mapping):
            raise SchemaError(part, "missing or not an object")


def empty_state(params: ModelParams | None = None) -> dict[str, Any]:
    """The exported state of an untrained model."""
    return RiskModel.from_params(params).export_state()


def merge_states(states: Sequence[Mapping[str, Any]], version: str = "") -> dict[str, Any]:
    """Merge the shared parts of several model states (count-weighted, order-independent).

    Scaler statistics merge exactly; linear weights are averaged weighted by sample count over
    the union of feature keys. Anomaly statistics are local and are not merged (``None``).
    Parameters come from the first state.

    >>> a, b = RiskModel(), RiskModel()
    >>> a.learn_one({"x": 1.0}, False); a.learn_one({"x": 3.0}, True)
    >>> merged = merge_states([a.export_state(), b.export_state()])
    >>> merged["linear"] == a.export_state()["linear"], merged["anomaly"]
    (True, None)
    """
    if not states:
        raise ValueError("merge_states needs at least one state")
    for st in states:
        _check_state(st)
    merged = {
        "v": MODEL_STATE_VERSION,
        "kind": MODEL_KIND,
        "version": version,
        "params": dict(states[0].get("params") or {}),
        "scaler": merge_scalers([st["scaler"] for st in states]),
        "linear": merge_linear([st["linear"] for st in states]),
        "anomaly": None,
    }
    raw = [st for st in states if st.get("raw_linear") is not None]
    if raw:  # the raw head merges like the full one, weighted by the same counts
        heads = merge_linear([{**st["linear"], **st["raw_linear"]} for st in raw])
        merged["raw_linear"] = {"weights": heads["weights"], "intercept": heads["intercept"]}
    return merged


__all__ = ["ModelParams", "RiskModel", "empty_linear", "empty_state", "merge_states"]
