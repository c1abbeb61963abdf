"""The retailer's side of a federated round: pure, no Kafka (the worker does the I/O).

- :func:`update_from_model` turns a :class:`~fraud.models.risk.RiskModel` into an
  ``fl.update`` for round ``r``: named vectors (one per feature key, ``f/<key>`` =
  ``[weight, mean, variance]``, plus ``intercept``) and the examples learned *since the last
  global model* (``export_delta``'s count, never the lifetime count);
- :func:`seal_update` signs it with the retailer's ML-DSA key and encrypts it to the
  aggregator's KEM key (purpose ``fl.update``); :func:`open_update` is the aggregator's inverse;
- :class:`GlobalModel` is what the aggregator publishes, signed (purpose ``fl.global``);
  :func:`open_global` verifies it and refuses a stale round or a replay;
- :func:`fold_in` merges the global model into the local one, personalised (see its docstring
  and fl/README.md "Fold-in").
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fl.update import ModelUpdate, UpdateFormatError, Vectors, as_vectors, read_header
from fl.watchlist import WatchFormatError, watchlist_from_wire, watchlist_to_wire
from pqc.envelope import open as open_envelope
from pqc.envelope import read_header as read_envelope_header
from pqc.envelope import seal, sign_document, verify_document
from pqc.freshness import DEFAULT_WINDOW, FreshnessStore, TimeWindow
from pqc.keys import Identity, KemKeyring, Registry, TrustedKey

if TYPE_CHECKING:  # fraud.models imports River and scipy (~2 s): the aggregator needs neither
    from fraud.models import RiverModel
    from fraud.models.risk import RiskModel

UPDATE_PURPOSE = "fl.update"
GLOBAL_PURPOSE = "fl.global"
GLOBAL_WIRE_VERSION = 1
FEATURE_PREFIX = "f/"
INTERCEPT = "intercept"
#: The mixing weights a retailer may give the global model (see :func:`fold_in`).
MIX_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


class StaleGlobal(ValueError):
    """A global model whose round is not newer than the one already folded in."""


# ----------------------------------------------------------------------------- model <-> vectors


def vectors_from_state(state: Mapping[str, Any]) -> Vectors:
    """The shared part of a model state as named vectors (weights, scaler mean/variance).

    Reads RiskModel's ``export_shared`` and River's ``export_linear_pipeline``
    (``StandardScaler | LogisticRegression``) alike: both hold ``scaler`` and ``linear``.
    """
    scaler = state["scaler"]
    weights = state["linear"]["weights"]
    keys = set(weights) | {k for k, n in scaler["counts"].items() if n > 0}
    out: Vectors = {}
    for key in sorted(keys):
        out[FEATURE_PREFIX + key] = np.array(
            [float(weights.get(key, 0.0)), float(scaler["means"].get(key, 0.0)),
             float(scaler["vars"].get(key, 0.0))]
        )
    out[INTERCEPT] = np.array([float(state["linear"]["intercept"])])
    return out


def state_from_vectors(vectors: Mapping[str, np.ndarray], template: Mapping[str, Any],
                       examples: int, version: str) -> dict[str, Any]:
    """``template`` (a RiskModel shared state or a River linear pipeline state, same shape)
    holding ``vectors``; everything else (params, counts) comes from ``template``.

    Counts are not federated (a count is what a poisoner inflates): a feature keeps the
    template's count, a feature new to it gets ``max(examples, 1)``; the label counts
    (``n``, ``n_pos``, ``n_neg``) are the template's.
    """
    count = float(max(examples, 1))
    own_counts = template["scaler"]["counts"]
    linear = template["linear"]
    weights: dict[str, float] = {}
    counts: dict[str, float] = {}
    means: dict[str, float] = {}
    variances: dict[str, float] = {}
    for name, values in vectors.items():
        if not name.startswith(FEATURE_PREFIX):
            continue
        key = name[len(FEATURE_PREFIX):]
        weights[key] = float(values[0])
        counts[key] = float(own_counts.get(key) or count)
        means[key] = float(values[1])
        variances[key] = max(float(values[2]), 0.0)
    intercept = vectors.get(INTERCEPT)
    state = dict(template)
    state["version"] = version
    state["scaler"] = {"counts": counts, "means": means, "vars": variances}
    state["linear"] = {
        **linear,
        "weights": weights,
        "intercept": float(intercept[0]) if intercept is not None else 0.0,
    }
    return state


def update_from_model(model: RiskModel, participant: str, round: int) -> ModelUpdate:
    """This round's update: the model's parameters now, and the labels learned since the base.

    ``export_delta`` counts only what was learned since the last :meth:`RiskModel.load_shared`,
    so a label that reached the global model once is never weighed again.
    """
    delta = model.export_delta()
    examples = max(int(delta["linear"]["n"]), 0)
    return ModelUpdate(participant, round, examples, vectors_from_state(model.export_shared()))


def update_from_state(state: Mapping[str, Any], participant: str, round: int,
                      examples: int) -> ModelUpdate:
    """An update from any state :func:`vectors_from_state` reads (e.g. a River linear
    pipeline's); ``examples`` are the labels learned since the last global, which River does
    not count: the caller does."""
    return ModelUpdate(participant, round, examples, vectors_from_state(state))


# ----------------------------------------------------------------------------- sealing


def seal_update(update: ModelUpdate, sender_key: Identity, aggregator_kem_public: TrustedKey,
                sequence: int, *, now: float | None = None) -> bytes:
    """The update as JSON, encrypted to the aggregator and signed by the retailer."""
    payload = json.dumps(update.to_wire(), separators=(",", ":")).encode()
    return seal(payload, sender_key, aggregator_kem_public, UPDATE_PURPOSE, sequence, now=now)


def open_update(blob: bytes, aggregator_kem: KemKeyring, registry: Registry,
                freshness: FreshnessStore, *, now: float | None = None) -> ModelUpdate:
    """Opens a sealed update (retailers only) and checks that its participant is its signer.

    Raises :class:`pqc.errors.EnvelopeError` subclasses or :class:`UpdateFormatError`.
    """
    payload, meta = open_envelope(blob, aggregator_kem, registry, freshness=freshness,
                                  purpose=UPDATE_PURPOSE, roles=("retailer",), now=now)
    try:
        wire = json.loads(payload)
    except ValueError as exc:
        raise UpdateFormatError("update", f"not JSON ({exc})") from None
    update = ModelUpdate.from_wire(wire)
    if update.participant != meta.sender:
        raise UpdateFormatError(
            "participant", f"{meta.sender} signed an update claiming to be {update.participant}"
        )
    return update


# ----------------------------------------------------------------------------- global model


@dataclass(frozen=True, eq=False)
class GlobalModel:
    """A round's aggregate as published: versioned, with its lineage."""

    round: int
    version: str
    parent_version: str | None
    contributors: tuple[str, ...]
    strategy: str
    examples: int
    parameters: Vectors = field(repr=False)
    watchlist: Mapping[str, int] = field(default_factory=dict, repr=False)
    """Hashed entity -> retailers that reported it (:mod:`fl.watchlist`); on the wire only
    when not empty."""
    new_devices: Mapping[str, int] = field(default_factory=dict, repr=False)
    """Hashed device -> retailers that saw it for the first time lately (the new-device
    reports); on the wire only when not empty, in the watchlist's form."""

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": GLOBAL_WIRE_VERSION,
            "participant": "aggregator",
            "round": self.round,
            "version": self.version,
            "parent_version": self.parent_version,
            "contributors": list(self.contributors),
            "strategy": self.strategy,
            "examples": self.examples,
            "parameters": {k: self.parameters[k].tolist() for k in sorted(self.parameters)},
            **({"watchlist": watchlist_to_wire(self.watchlist)} if self.watchlist else {}),
            **({"new_devices": watchlist_to_wire(self.new_devices)} if self.new_devices
               else {}),
        }

    @classmethod
    def from_wire(cls, wire: Any) -> GlobalModel:
        _, round_ = read_header(wire)
        version = wire.get("version")
        parent = wire.get("parent_version")
        contributors = wire.get("contributors")
        strategy = wire.get("strategy")
        examples = wire.get("examples")
        if not isinstance(version, str) or not version:
            raise UpdateFormatError("version", "must be a non-empty string")
        if parent is not None and not isinstance(parent, str):
            raise UpdateFormatError("parent_version", "must be a string or null")
        if not isinstance(contributors, list) or not all(isinstance(c, str) for c in contributors):
            raise UpdateFormatError("contributors", "must be a list of names")
        if not isinstance(strategy, str):
            raise UpdateFormatError("strategy", "must be a string")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
            raise UpdateFormatError("examples", "must be an integer >= 0")
        lists: dict[str, dict[str, int]] = {"watchlist": {}, "new_devices": {}}
        for name in lists:
            if wire.get(name) is not None:
                try:
                    lists[name] = watchlist_from_wire(wire[name])
                except WatchFormatError as error:
                    raise UpdateFormatError(name, str(error)) from None
        return cls(round_, version, parent, tuple(contributors), strategy, examples,
                   as_vectors(wire.get("parameters"), "parameters"), lists["watchlist"],
                   lists["new_devices"])

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_wire(), separators=(",", ":")).encode()


def sign_global(model: GlobalModel, aggregator: Identity, sequence: int, *,
                now: float | None = None) -> bytes:
    """The global model as a signed (not encrypted) document: every retailer reads it."""
    return sign_document(model.to_bytes(), aggregator, GLOBAL_PURPOSE, sequence, now=now)


def read_global_unverified_round(blob: bytes) -> dict[str, Any]:
    """The body of a signed global document, unverified: only for the aggregator's own log."""
    header = read_envelope_header(blob)
    body = blob[header.header_length: header.header_length + header.body_length]
    parsed: dict[str, Any] = json.loads(body)
    return parsed


def open_global(blob: bytes, registry: Registry, freshness: FreshnessStore, *,
                last_round: int | None = None, window: TimeWindow = DEFAULT_WINDOW,
                now: float | None = None) -> GlobalModel:
    """Verifies the aggregator's signature, purpose and sequence; refuses a round <= last_round.

    A replayed document fails in ``freshness`` (its sequence is not new); an old but freshly
    re-signed one, or one from before a restart, fails the round check (:class:`StaleGlobal`).
    ``window`` bounds the document's age (a worker that starts long after the last round
    passes a wider one than the envelopes' default).
    """
    payload, _meta = verify_document(blob, registry, freshness=freshness, purpose=GLOBAL_PURPOSE,
                                     roles=("aggregator",), window=window, now=now)
    try:
        wire = json.loads(payload)
    except ValueError as exc:
        raise UpdateFormatError("global", f"not JSON ({exc})") from None
    model = GlobalModel.from_wire(wire)
    if last_round is not None and model.round <= last_round:
        raise StaleGlobal(f"global model of round {model.round}, already at round {last_round}")
    return model


# ----------------------------------------------------------------------------- fold-in


_Groups = list[tuple[tuple[str, ...], np.ndarray, np.ndarray]]


def _grouped(recent: Sequence[tuple[Mapping[str, float], bool]]) -> _Groups:
    """``recent`` as ``(keys, values, labels)`` per distinct feature set, for batch scoring."""
    groups: dict[tuple[str, ...], tuple[list[list[float]], list[bool]]] = {}
    for x, y in recent:
        rows, labels = groups.setdefault(tuple(x), ([], []))
        rows.append(list(x.values()))
        labels.append(bool(y))
    return [(keys, np.array(rows, dtype=np.float64), np.array(labels, dtype=bool))
            for keys, (rows, labels) in groups.items()]


def _scores(model: RiskModel, groups: _Groups) -> np.ndarray:
    """``model``'s scores of the grouped rows, in group order (one compiled call a group)."""
    return np.concatenate([np.array(model.score_and_explain_many(keys, values, 0)[0])
                           for keys, values, _ in groups])


def _rank_losses(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each fraud, the share of legitimate rows scored above it (ties count half): what
    ranking frauds first (average precision, a hold threshold) depends on; its mean is
    1 - ROC AUC. Calibration (a shifted intercept) does not change it."""
    negatives = np.sort(scores[~labels])
    positives = scores[labels]
    right = np.searchsorted(negatives, positives, side="right")
    left = np.searchsorted(negatives, positives, side="left")
    above = len(negatives) - right + 0.5 * (right - left)
    result: np.ndarray = above / len(negatives)
    return result


@dataclass
class MixRecord:
    """A retailer's out-of-sample record of each mixing weight, kept between fold-ins.

    At each fold-in the candidates (one per mix) are frozen; at the next one they score the
    labels that arrived in between, which none of them has learned. Per fraud, the gain of a
    mix is how many fewer legitimate rows (as a share) rank above it than under the own model
    (mix 0); the record sums the gains and their squares over every fold-in so far.

    :meth:`observe` scores labels as they come (a worker calls it per batch of labels), so a
    fold-in only ranks the scores kept: scoring a round's labels all at once held a worker's
    event loop for ~30 ms at 150 labels/s and 10 s rounds. ``limit`` keeps the newest so many.
    """

    candidates: dict[float, dict[str, Any]] = field(default_factory=dict)
    sums: dict[float, float] = field(default_factory=dict)
    squares: dict[float, float] = field(default_factory=dict)
    frauds: int = 0
    limit: int | None = None
    _models: dict[float, Any] = field(default_factory=dict, repr=False, compare=False)
    # per chunk observed since the candidates were frozen: each mix's scores, and the labels
    _observed: deque[tuple[dict[float, np.ndarray], np.ndarray]] = field(
        default_factory=deque, repr=False, compare=False)
    _kept: int = field(default=0, repr=False, compare=False)

    def freeze(self, candidates: dict[float, dict[str, Any]]) -> None:
        """The candidates the labels from now on are scored by (the previous ones' scores go)."""
        self.candidates = candidates
        self._models = {}
        self._observed.clear()
        self._kept = 0

    def observe(self, fresh: Sequence[tuple[Mapping[str, float], bool]]) -> None:
        """Scores ``fresh`` (labels none of the frozen candidates learned) by each of them."""
        if not self.candidates or not fresh:
            return
        if not self._models:
            from fraud.models.risk import RiskModel

            self._models = {mix: RiskModel.from_state(st) for mix, st in self.candidates.items()}
        groups = _grouped(fresh)
        labels = np.concatenate([y for _, _, y in groups])
        self._observed.append(({mix: _scores(model, groups)
                                for mix, model in self._models.items()}, labels))
        self._kept += len(labels)
        while self.limit is not None and self._kept > self.limit:
            scores, oldest = self._observed[0]
            extra = self._kept - self.limit
            if extra >= len(oldest):
                self._observed.popleft()
                self._kept -= len(oldest)
            else:
                self._observed[0] = ({m: v[extra:] for m, v in scores.items()}, oldest[extra:])
                self._kept -= extra

    def score(self, fresh: Sequence[tuple[Mapping[str, float], bool]] = ()) -> None:
        """Adds the frozen candidates' record on the labels observed since they were frozen
        and ``fresh``, and forgets those scores."""
        self.observe(fresh)
        if not self._observed:
            return
        labels = np.concatenate([y for _, y in self._observed])
        scores = {mix: np.concatenate([s[mix] for s, _ in self._observed])
                  for mix in self._models}
        self._observed.clear()
        self._kept = 0
        if labels.all() or not labels.any():
            return
        losses = {mix: _rank_losses(s, labels) for mix, s in scores.items()}
        own = losses[min(losses)]
        for mix, loss in losses.items():
            d = own - loss
            self.sums[mix] = self.sums.get(mix, 0.0) + float(d.sum())
            self.squares[mix] = self.squares.get(mix, 0.0) + float((d * d).sum())
        self.frauds += int(labels.sum())

    def best(self, grid: Sequence[float], evidence: float) -> float | None:
        """The mix with the largest mean gain over ``evidence`` standard errors, the own model
        (the smallest mix) if none, ``None`` before any fraud was scored."""
        n = self.frauds
        if n < 2:
            return None
        chosen, best = min(grid), 0.0
        for mix in grid:
            if mix not in self.sums:
                continue
            mean = self.sums[mix] / n
            var = max(self.squares[mix] / n - mean * mean, 0.0) * n / (n - 1)
            if mean > evidence * math.sqrt(var / n) and mean > best:
                chosen, best = mix, mean
        return chosen


def blend(local: Vectors, global_: Mapping[str, np.ndarray], mix: float) -> Vectors:
    """``mix * global + (1 - mix) * local`` per name; a name one side lacks keeps the other's,
    except at ``mix`` 0: the own model exactly, without the names only the global knows (a
    feature adopted then would start from the federation's weight when it first appears
    here, so "keep the own model" would not be the own model's future)."""
    out: Vectors = {}
    for name in sorted(set(local) | set(global_)):
        if name not in global_:
            out[name] = np.array(local[name])
        elif name not in local:
            if mix > 0.0:
                out[name] = np.array(global_[name], dtype=np.float64)
        else:
            out[name] = mix * np.asarray(global_[name]) + (1.0 - mix) * local[name]
    return out


def fold_in(model: RiskModel, global_model: GlobalModel,
            recent: Sequence[tuple[Mapping[str, float], bool]], *,
            min_labels: int = 20, grid: Sequence[float] = MIX_GRID,
            evidence: float = 2.0, record: MixRecord | None = None,
            fresh: Sequence[tuple[Mapping[str, float], bool]] = ()) -> float:
    """Folds ``global_model`` into ``model`` in place; returns the mixing weight chosen.

    local' = mix * global + (1 - mix) * local, on weights, intercept and scaler moments, where
    ``mix`` in ``grid`` is the smallest (keep the own model) unless another ranks this
    retailer's own frauds above its own legitimate rows better, by more than ``evidence``
    standard errors of the per-fraud differences (the largest such gain wins; see
    :func:`_rank_losses`). With a ``record`` the evidence is out of sample: the candidates
    frozen at the previous fold-in, scored on the labels since (``fresh``, and those the
    record observed as they came: :meth:`MixRecord.observe`), summed over all
    fold-ins (:class:`MixRecord`); before it has any, the own model is kept. Without one the
    test runs in sample on ``recent``. With fewer than ``min_labels`` recent labels, or no
    fraud among them, there is no evidence either way and the own model is kept too: the
    federated model must earn its place on the retailer's own frauds. The result is
    loaded with :meth:`RiskModel.load_shared`, so it becomes the base and
    :meth:`RiskModel.export_delta` reports only labels learned after this call.
    The label counts stay the model's own, so the labels it had already sent are not sent
    again, and the global model's are never added to them.
    The local anomaly statistics are untouched.
    """
    template = model.export_shared()
    local = vectors_from_state(template)
    candidates: dict[float, dict[str, Any]] = {}
    for mix in grid:
        candidates[mix] = state_from_vectors(
            blend(local, global_model.parameters, mix), template, global_model.examples,
            global_model.version,
        )
    # no evidence either way (too few labels, or no fraud among them): the own model; a blend
    # taken then (the middle mix, once the default) moves the model off its own path for good
    # with nothing to show it ranks this retailer's frauds better
    undecided = min(grid)
    settled = None
    if record is not None:
        record.score(fresh)
        settled = record.best(grid, evidence)
        record.freeze(candidates)
    if len(grid) == 1:
        chosen = grid[0]
    elif settled is not None:
        chosen = settled
    elif record is not None:
        # no out-of-sample evidence yet: keep the own model, unless it has seen too few
        # labels or no fraud (then it knows little and the middle mix is taken)
        frauds = sum(1 for _, y in recent if y)
        chosen = (min(grid) if len(recent) >= min_labels and 0 < frauds < len(recent)
                  else undecided)
    elif len(recent) < min_labels:
        chosen = undecided
    else:
        from fraud.models.risk import RiskModel

        groups = _grouped(recent)
        labels = np.concatenate([y for _, _, y in groups])
        chosen = min(grid)
        if labels.all() or not labels.any():
            # no fraud (or nothing else) among the retailer's labels: no evidence either way
            chosen = undecided
        else:
            # keeping its own model (the smallest mix) is the default: another mix must rank
            # the retailer's own frauds above its legitimate rows better, by more than
            # `evidence` standard errors of the paired per-fraud differences
            losses = {mix: _rank_losses(_scores(RiskModel.from_state(st), groups), labels)
                      for mix, st in candidates.items()}
            base = losses[chosen]
            best = 0.0
            for mix in grid:
                d = base - losses[mix]
                gain = float(d.mean())
                se = float(d.std(ddof=1)) / math.sqrt(d.size) if d.size > 1 else math.inf
                if gain > evidence * se and gain > best:
                    chosen, best = mix, gain
    model.load_shared(candidates[chosen])
    return chosen


def fold_in_river(model: RiverModel, global_model: GlobalModel,
                  recent: Sequence[tuple[Mapping[str, float], bool]], *,
                  min_labels: int = 20) -> float:
    """:func:`fl.client.fold_in` for River's ``StandardScaler | LogisticRegression``: the
    same personalised blend (``mix`` from :data:`fl.client.MIX_GRID` by log-loss on the
    retailer's recent labels), the model's own label counts kept; returns ``mix``."""
    from fraud.models import RiverModel as River  # here: the aggregator never imports River

    template = model.export_state()
    local = vectors_from_state(template)
    candidates = {mix: River.from_state(state_from_vectors(
        blend(local, global_model.parameters, mix), template, global_model.examples,
        global_model.version)) for mix in MIX_GRID}
    if len(recent) < min_labels:
        chosen = 0.5
    else:
        losses = {mix: _log_loss(candidate, recent) for mix, candidate in candidates.items()}
        chosen = min(MIX_GRID, key=lambda m: (round(losses[m], 12), -m))
    model.estimator = candidates[chosen].estimator
    model.version = global_model.version
    return chosen


def _log_loss(model: RiverModel, recent: Sequence[tuple[Mapping[str, float], bool]]
              ) -> float:
    eps = 1e-6
    total = 0.0
    for x, y in recent:
        p = min(max(model.predict_proba_one(x)[True], eps), 1.0 - eps)
        total -= math.log(p if y else 1.0 - p)
    return total / len(recent)
