"""The default risk model: scaling + logistic regression, blended with a local anomaly score.

Three parts, all plain data:

* ``scaler``: a :class:`~fraud.models.scaler.RunningScaler` updated on labelled events;
* ``linear``: logistic-regression weights trained by SGD on the scaled features, positives
  up-weighted by the running negative/positive ratio (capped at ``max_pos_weight``);
* ``anomaly``: per-feature running mean/variance of *every* scored event (labelled or not);
  the anomaly score is the mean clipped squared z-score, squashed to [0, 1). A retailer with no
  labels still gets a useful score from it.

``score = alpha * p_supervised + (1 - alpha) * anomaly`` with
``alpha = (1 - anomaly_weight) * n_pos / (n_pos + warmup_positives)``: the supervised part takes
over as fraud labels arrive.

Federation: ``scaler`` and ``linear`` are shared (:func:`merge_states`,
:meth:`RiskModel.load_shared`); the anomaly statistics stay local to the worker (they
describe that retailer's normal traffic) but are exported with the full state, so a
restarted worker restores them.

>>> model = RiskModel()
>>> normal = {"amount_log": 3.0, "n_1h": 1.0}
>>> for i in range(200):
...     x = {"amount_log": 3.0 + (i % 7) / 10, "n_1h": float(i % 3)}
...     model.learn_one(x, False)
...     _ = model.score_one(x)
...     if i % 20 == 0:
...         y = {"amount_log": 8.0, "n_1h": 9.0}
...         model.learn_one(y, True)
...         _ = model.score_one(y)
>>> model.score_one({"amount_log": 8.5, "n_1h": 8.0}) > 0.8 > model.score_one(normal)
True
>>> clone = RiskModel.from_state(json.loads(json.dumps(model.export_state())))
>>> clone.score_one(normal, observe=False) == model.score_one(normal, observe=False)
True
>>> sorted(name for name, _ in model.contributions({"amount_log": 8.5, "n_1h": 8.0}))
['amount_log', 'n_1h']
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

import numpy as np

from fraud.models.kernels import learn_rows, score_matrix, score_rows, top_positive
from fraud.models.linear import empty_linear, merge_linear
from fraud.models.scaler import RunningScaler, merge_scalers
from fraud.schema import SchemaError

MODEL_STATE_VERSION: Final = 1
MODEL_KIND: Final = "risk_model"


@dataclass(frozen=True, slots=True)
class ModelParams:
    """Hyper-parameters of :class:`RiskModel`; plain data via ``to_dict``/``from_dict``."""

    learning_rate: float = 0.03
    l2: float = 0.0
    clip: float = 6.0
    max_pos_weight: float = 20.0
    anomaly_weight: float = 0.1
    warmup_positives: float = 20.0
    anomaly_scale: float = 3.0
    anomaly_min_events: int = 30

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
            values[key] = int(value) if key == "anomaly_min_events" else float(value)
        if not 0.0 <= values.get("anomaly_weight", 0.0) <= 1.0:
            raise SchemaError("params.anomaly_weight", "must be in [0, 1]")
        return cls(**values)


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

    __slots__ = ("data", "index", "names", "width")

    def __init__(self, width: int, capacity: int = 64) -> None:
        self.width = width
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


class RiskModel:
    """Online fraud-risk model with River-style ``learn_one``/``predict_proba_one``.

    Feature vectors are plain ``dict[str, float]`` (keys absent from a vector contribute
    nothing), so a vector stored at scoring time can be passed to ``learn_one`` when its label
    arrives. ``score_one`` also feeds the local anomaly statistics unless ``observe=False``.

    The statistics live in float64 tables walked by compiled loops
    (:mod:`fraud.models.kernels`); the rows of a key order that keeps repeating (what
    :class:`~fraud.features.FeatureExtractor` produces) are looked up once.
    """

    def __init__(self, params: ModelParams | None = None, version: str = "local") -> None:
        self.params = params or ModelParams()
        self.version = version
        # supervised scaler and weights: [count, mean, m2, 1/std, weight] per feature
        self._scaler = _StatsTable(5)
        # local anomaly statistics: [count, mean, m2, 1/std] per feature
        self._anomaly = _StatsTable(4)
        self.anomaly_seen = 0
        self.intercept = 0.0
        self.n = 0
        self.n_pos = 0
        self.n_neg = 0
        self._rows: _Rows | None = None

    @property
    def weights(self) -> dict[str, float]:
        """The linear weights by feature."""
        return {k: r[4] for k, r in self._scaler.records()}

    @property
    def scaler(self) -> RunningScaler:
        """A snapshot of the supervised scaler's statistics."""
        return self._scaler.scaler(self.params.clip)

    @property
    def anomaly(self) -> RunningScaler:
        """A snapshot of the local anomaly statistics."""
        return self._anomaly.scaler(self.params.clip)

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
        keys = tuple(x)
        rows = self._rows_for(keys, False, observe)
        values = np.fromiter(x.values(), np.float64, len(keys))
        dot, zz = score_rows(self._scaler.data, self._anomaly.data, rows.srows, rows.arows,
                             values, self.params.clip, self.intercept, observe, contributions)
        if observe:
            self.anomaly_seen += 1
        return dot, zz, rows

    def _blend(self, dot: float, zz: float, count: int) -> float:
        params = self.params
        if self.anomaly_seen > params.anomaly_min_events and count:
            m = zz / count
            anomaly = m / (m + params.anomaly_scale)
        else:
            anomaly = 0.0
        n_pos = self.n_pos
        if not n_pos:
            return anomaly
        alpha = (1.0 - params.anomaly_weight) * n_pos / (n_pos + params.warmup_positives)
        if dot < -35.0:
            dot = -35.0
        elif dot > 35.0:
            dot = 35.0
        return alpha / (1.0 + _exp(-dot)) + (1.0 - alpha) * anomaly

    def score_one(self, x: Mapping[str, float], observe: bool = True) -> float:
        """Combined risk in [0, 1]; with ``observe`` the anomaly statistics learn ``x``."""
        dot, zz, _ = self._run(x, observe)
        return self._blend(dot, zz, len(x))

    def score_and_explain(
        self, x: Mapping[str, float], k: int = 3, observe: bool = True
    ) -> tuple[float, list[tuple[str, float]]]:
        """``(score_one(x, observe), contributions(x, k))`` in one pass over ``x``."""
        values = np.fromiter(x.values(), np.float64, len(x)).reshape(1, len(x))
        scores, explained = self.score_and_explain_many(tuple(x), values, k, observe)
        return scores[0], explained[0]

    def score_and_explain_many(
        self, keys: tuple[str, ...], X: np.ndarray, k: int = 3, observe: bool = True
    ) -> tuple[list[float], list[list[tuple[str, float]]]]:
        """``score_and_explain`` of each row of ``X`` (values of ``keys``, in that order), in
        order, with one compiled call for all rows: the same scores and contributions,
        bit for bit, and the same anomaly statistics afterwards.

        >>> model = RiskModel()
        >>> rows = np.array([[3.0, 1.0], [3.5, 0.0], [9.0, 7.0]])
        >>> twin = RiskModel()
        >>> xs = [{"a": a, "b": b} for a, b in rows.tolist()]
        >>> [(twin.score_one(x), twin.contributions(x, 2)) for x in xs] == [
        ...     *zip(*model.score_and_explain_many(("a", "b"), rows, 2))]
        True
        """
        if X.ndim != 2 or X.shape[1] != len(keys):
            raise ValueError(f"expected rows of {len(keys)} values, got shape {X.shape}")
        if not X.shape[0]:
            return [], []
        rows = self._rows_for(keys, False, observe)
        values = np.ascontiguousarray(X, dtype=np.float64)
        top = max(k, 0)
        dots, zzs, chosen, chosen_terms = score_matrix(
            self._scaler.data, self._anomaly.data, rows.srows, rows.arows, values,
            self.params.clip, self.intercept, observe, rows.ranks, top)
        blend = self._blend
        width = len(keys)
        scores = []
        for dot, zz in zip(dots.tolist(), zzs.tolist(), strict=True):
            if observe:  # each row's blend sees the count after its own observation
                self.anomaly_seen += 1
            scores.append(blend(dot, zz, width))
        explained = [[(keys[i], c) for i, c in zip(ids, cs, strict=True) if i >= 0]
                     for ids, cs in zip(chosen.tolist(), chosen_terms.tolist(), strict=True)]
        return scores, explained

    def score_many(self, xs: Iterable[Mapping[str, float]], observe: bool = True) -> list[float]:
        """``score_one`` for each vector, in order (:meth:`score_and_explain_many` is the
        hot path's batch form)."""
        score = self.score_one
        return [score(x, observe) for x in xs]

    def predict_proba_one(self, x: Mapping[str, float]) -> dict[bool, float]:
        """River-style class probabilities of the combined score; learns nothing."""
        p = self.score_one(x, observe=False)
        return {False: 1.0 - p, True: p}

    def predict_proba_many(self, xs: Iterable[Mapping[str, float]]) -> list[float]:
        """Risk scores of many vectors; learns nothing."""
        return self.score_many(xs, observe=False)

    def supervised_proba(self, x: Mapping[str, float]) -> float:
        """The logistic-regression probability alone."""
        return _sigmoid(self.intercept + sum(c for _, c in self._terms(x)))

    def anomaly_score(self, x: Mapping[str, float]) -> float:
        """The anomaly part alone, in [0, 1)."""
        if not x or self.anomaly_seen <= self.params.anomaly_min_events:
            return 0.0
        _, zz, _ = self._run(x, False)
        m = zz / len(x)
        return m / (m + self.params.anomaly_scale)

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
    def observe_one(self, x: Mapping[str, float]) -> None:
        """Update only the anomaly statistics (unlabelled traffic)."""
        self._run(x, True)

    def learn_one(self, x: Mapping[str, float], y: bool | int | float) -> None:
        """One SGD step on ``(x, y)`` after updating the scaler with ``x``."""
        keys = tuple(x)
        rows = self._rows_for(keys, True, False)
        params = self.params
        weight = 1.0
        if y:
            weight = (self.n_neg + 1.0) / (self.n_pos + 1.0)
            if weight > params.max_pos_weight:
                weight = params.max_pos_weight
            elif weight < 1.0:
                weight = 1.0
            self.n_pos += 1
        else:
            self.n_neg += 1
        self.n += 1
        step = learn_rows(self._scaler.data, rows.srows,
                          np.fromiter(x.values(), np.float64, len(keys)), params.clip,
                          self.intercept, bool(y), weight, params.learning_rate,
                          1.0 - params.learning_rate * params.l2)
        self.intercept -= step

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
        """The federated part (scaler + linear) as versioned plain data, no anomaly stats."""
        return {
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

    def export_state(self) -> dict[str, Any]:
        """Everything, as versioned plain data (JSON- and msgpack-safe); never pickle."""
        state = self.export_shared()
        state["anomaly"] = self.anomaly.to_dict()
        return state

    def load_shared(self, state: Mapping[str, Any]) -> None:
        """Replace scaler + linear by ``state``'s (e.g. a new global model); keep local anomaly."""
        other = RiskModel.from_state(state)
        self.version = other.version
        self._scaler = other._scaler
        self._rows = None
        self.intercept = other.intercept
        self.n, self.n_pos, self.n_neg = other.n, other.n_pos, other.n_neg

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RiskModel:
        """Rebuild from :meth:`export_state` data; raises ``SchemaError`` naming a bad field."""
        _check_state(state)
        params = ModelParams.from_dict(state.get("params"))
        model = cls(params, version=str(state.get("version", "")))
        try:
            scaler = RunningScaler.from_dict(state["scaler"], params.clip)
            linear = state["linear"]
            weights = {str(k): float(v) for k, v in linear["weights"].items()}
            model.intercept = float(linear["intercept"])
            model.n = int(linear["n"])
            model.n_pos = int(linear["n_pos"])
            model.n_neg = int(linear["n_neg"])
            if state.get("anomaly"):
                anomaly = RunningScaler.from_dict(state["anomaly"], params.clip)
                model._anomaly = _StatsTable.from_scaler(anomaly, 4)
                counts = state["anomaly"]["counts"].values()
                model.anomaly_seen = int(max(counts, default=0))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SchemaError("model", f"malformed model state: {exc!r}") from None
        stats = scaler.stats
        for k in weights:
            if k not in stats:
                stats[k] = [1.0, 0.0, 0.0, 0.0]
        table = model._scaler = _StatsTable.from_scaler(scaler, 5)
        for k, w in weights.items():
            table.data[table.index[k], 4] = w
        return model

    def to_json(self) -> bytes:
        return json.dumps(self.export_state(), separators=(",", ":")).encode()


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
    return RiskModel(params).export_state()


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
    return {
        "v": MODEL_STATE_VERSION,
        "kind": MODEL_KIND,
        "version": version,
        "params": dict(states[0].get("params") or {}),
        "scaler": merge_scalers([st["scaler"] for st in states]),
        "linear": merge_linear([st["linear"] for st in states]),
        "anomaly": None,
    }


__all__ = ["ModelParams", "RiskModel", "empty_linear", "empty_state", "merge_states"]
