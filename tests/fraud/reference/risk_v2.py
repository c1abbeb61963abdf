# Frozen copy of fraud/models/risk.py at commit 6f653c3, before the fast paths: the reference
# for tests/fraud/test_fast_paths.py. Do not edit. Re-frozen as v2 when RiskModel became a River
# classifier, with three deliberate changes marked "v2:": scoring learns nothing unless asked
# (observe defaults to False), an observed event's score gates the anomaly part on the count
# *before* its own observation (so score + observe equals predict, then learn_unsupervised_one),
# and load_shared remembers the global model as the state's "base" (for per-round deltas).
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
...     _ = model.score_one(x, observe=True)
...     if i % 20 == 0:
...         y = {"amount_log": 8.0, "n_1h": 9.0}
...         model.learn_one(y, True)
...         _ = model.score_one(y, observe=True)
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


_sqrt = math.sqrt
_exp = math.exp


def _sigmoid(s: float) -> float:
    if s < -35.0:
        return 6.305116760146989e-16
    if s > 35.0:
        return 1.0 - 6.305116760146989e-16
    return 1.0 / (1.0 + math.exp(-s))


class RiskModel:
    """Online fraud-risk model with River-style ``learn_one``/``predict_proba_one``.

    Feature vectors are plain ``dict[str, float]`` (keys absent from a vector contribute
    nothing), so a vector stored at scoring time can be passed to ``learn_one`` when its label
    arrives. ``score_one`` also feeds the local anomaly statistics unless ``observe=False``.
    """

    def __init__(self, params: ModelParams | None = None, version: str = "local") -> None:
        self.params = params or ModelParams()
        self.version = version
        # supervised scaler; each feature's list is [count, mean, m2, 1/std, weight]
        self.scaler = RunningScaler(self.params.clip)
        # local anomaly statistics; [count, mean, m2, 1/std]
        self.anomaly = RunningScaler(self.params.clip)
        self.anomaly_seen = 0
        self.intercept = 0.0
        self.n = 0
        self.n_pos = 0
        self.n_neg = 0
        self.base: dict[str, Any] | None = None  # v2

    @property
    def weights(self) -> dict[str, float]:
        """The linear weights by feature."""
        return {k: s[4] for k, s in self.scaler.stats.items()}

    # -- scoring ---------------------------------------------------------------------------
    def _alpha(self) -> float:
        p = self.params
        return (1.0 - p.anomaly_weight) * self.n_pos / (self.n_pos + p.warmup_positives)

    def score_one(self, x: Mapping[str, float], observe: bool = False) -> float:
        """Combined risk in [0, 1]; with ``observe`` the anomaly statistics learn ``x``."""
        stats = self.scaler.stats.get
        an = self.anomaly.stats
        anget = an.get
        params = self.params
        clip = params.clip
        nclip = -clip
        c2 = clip * clip
        dot = self.intercept
        zz = 0.0
        for k, v in x.items():
            s = stats(k)
            if s is not None:
                z = (v - s[1]) * s[3]
                if z > clip:
                    z = clip
                elif z < nclip:
                    z = nclip
                dot += s[4] * z
            a = anget(k)
            if a is None:
                if observe:
                    an[k] = [1.0, v, 0.0, 0.0]
                continue
            d = v - a[1]
            z = d * a[3]
            z *= z
            zz += z if z < c2 else c2
            if observe:
                n = a[0] + 1.0
                mean = a[1] + d / n
                m2 = a[2] + d * (v - mean)
                a[0] = n
                a[1] = mean
                a[2] = m2
                # v1 tested m2 > 0 and divided by zero when m2 / n rounded to 0 (a subnormal
                # m2); fixed here as the model (fraud.models) has it, the only changes to this copy
                a[3] = 1.0 / _sqrt(m2 / n) if m2 / n > 0.0 else 0.0
        # v2: the gate reads the count before this event's own observation
        if self.anomaly_seen > params.anomaly_min_events and x:
            m = zz / len(x)
            anomaly = m / (m + params.anomaly_scale)
        else:
            anomaly = 0.0
        if observe:
            self.anomaly_seen += 1
        n_pos = self.n_pos
        if not n_pos:
            return anomaly
        alpha = (1.0 - params.anomaly_weight) * n_pos / (n_pos + params.warmup_positives)
        if dot < -35.0:
            dot = -35.0
        elif dot > 35.0:
            dot = 35.0
        return alpha / (1.0 + _exp(-dot)) + (1.0 - alpha) * anomaly

    def score_many(self, xs: Iterable[Mapping[str, float]], observe: bool = False) -> list[float]:
        """``score_one`` for each vector, in order (the batch form for the hot path)."""
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
        z = self.anomaly.transform_one(x)
        m = sum(v * v for v in z.values()) / len(x)
        return m / (m + self.params.anomaly_scale)

    def _terms(self, x: Mapping[str, float]) -> list[tuple[str, float]]:
        stats, clip = self.scaler.stats, self.params.clip
        out = []
        for k, v in x.items():
            s = stats.get(k)
            if s is not None:
                z = (v - s[1]) * s[3]
                out.append((k, s[4] * (clip if z > clip else -clip if z < -clip else z)))
        return out

    def contributions(self, x: Mapping[str, float], k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` largest positive terms ``weight * z`` of the linear model, largest first."""
        terms = [t for t in self._terms(x) if t[1] > 0.0]
        terms.sort(key=lambda t: (-t[1], t[0]))
        return terms[:k]

    # -- learning --------------------------------------------------------------------------
    def observe_one(self, x: Mapping[str, float]) -> None:
        """Update only the anomaly statistics (unlabelled traffic)."""
        self.anomaly.learn_one(x)
        self.anomaly_seen += 1

    def learn_one(self, x: Mapping[str, float], y: bool | int | float) -> None:
        """One SGD step on ``(x, y)`` after updating the scaler with ``x``."""
        params = self.params
        clip = params.clip
        nclip = -clip
        stats = self.scaler.stats
        get = stats.get
        recs: list[list[float]] = []
        zs: list[float] = []
        dot = self.intercept
        for k, v in x.items():
            s = get(k)
            if s is None:
                stats[k] = [1.0, v, 0.0, 0.0, 0.0]
                continue
            n = s[0] + 1.0
            mean = s[1] + (v - s[1]) / n
            m2 = s[2] + (v - s[1]) * (v - mean)
            inv = 1.0 / _sqrt(m2 / n) if m2 / n > 0.0 else 0.0  # fixed as above
            s[0] = n
            s[1] = mean
            s[2] = m2
            s[3] = inv
            z = (v - mean) * inv
            if z > clip:
                z = clip
            elif z < nclip:
                z = nclip
            recs.append(s)
            zs.append(z)
            dot += s[4] * z
        if dot < -35.0:
            dot = -35.0
        elif dot > 35.0:
            dot = 35.0
        p = 1.0 / (1.0 + _exp(-dot))
        if y:
            weight = (self.n_neg + 1.0) / (self.n_pos + 1.0)
            if weight > params.max_pos_weight:
                weight = params.max_pos_weight
            elif weight < 1.0:
                weight = 1.0
            g = (p - 1.0) * weight
            self.n_pos += 1
        else:
            g = p
            self.n_neg += 1
        self.n += 1
        step = params.learning_rate * g
        decay = 1.0 - params.learning_rate * params.l2
        if decay != 1.0:
            for s, z in zip(recs, zs, strict=True):
                s[4] = s[4] * decay - step * z
        else:
            for s, z in zip(recs, zs, strict=True):
                s[4] -= step * z
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
        state["base"] = self.base  # v2
        return state

    def load_shared(self, state: Mapping[str, Any]) -> None:
        """Replace scaler + linear by ``state``'s (e.g. a new global model); keep local anomaly."""
        other = RiskModel.from_state(state)
        self.version = other.version
        self.scaler = other.scaler
        self.intercept = other.intercept
        self.n, self.n_pos, self.n_neg = other.n, other.n_pos, other.n_neg
        self.base = {"version": other.version, "n": other.n, "n_pos": other.n_pos,  # v2
                     "n_neg": other.n_neg, "scaler": other.scaler.to_dict()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RiskModel:
        """Rebuild from :meth:`export_state` data; raises ``SchemaError`` naming a bad field."""
        _check_state(state)
        params = ModelParams.from_dict(state.get("params"))
        model = cls(params, version=str(state.get("version", "")))
        try:
            model.scaler = RunningScaler.from_dict(state["scaler"], params.clip)
            linear = state["linear"]
            weights = {str(k): float(v) for k, v in linear["weights"].items()}
            model.intercept = float(linear["intercept"])
            model.n = int(linear["n"])
            model.n_pos = int(linear["n_pos"])
            model.n_neg = int(linear["n_neg"])
            if state.get("anomaly"):
                model.anomaly = RunningScaler.from_dict(state["anomaly"], params.clip)
                counts = state["anomaly"]["counts"].values()
                model.anomaly_seen = int(max(counts, default=0))
            model.base = state.get("base")  # v2
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SchemaError("model", f"malformed model state: {exc!r}") from None
        stats = model.scaler.stats
        for k in weights:
            if k not in stats:
                stats[k] = [1.0, 0.0, 0.0, 0.0]
        for k, s in stats.items():
            s.append(weights.get(k, 0.0))
        return model

    def to_json(self) -> bytes:
        return json.dumps(self.export_state(), separators=(",", ":")).encode()


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
