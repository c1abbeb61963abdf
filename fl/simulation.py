"""Federated learning simulated in-process over a prequential evaluation (``--mode federated``).

Each retailer runs its own feature state and model over its own rows exactly as in ``local``
mode (:func:`fraud.evaluation.run_streams`); on top, the retailers take part in rounds with the
code the real path uses, minus Kafka and crypto:

1. a retailer that has seen ``sync_every`` of its own rows since its last update offers
   :func:`fl.client.update_from_model` for the open round (:class:`fl.aggregator.Round`);
2. the round closes when every retailer seen so far has offered (the quorum), or
   ``sync_every * retailers`` rows after its first update (the deadline, counted in rows:
   a retailer with little traffic misses the round instead of stalling it);
3. the round's strategy (``fedavg``, ``fedmedian``, ``fedtrimmedavg``) aggregates it
   (:meth:`fl.aggregator.Round.close`), and every retailer folds the global model into its own
   with :func:`fl.client.fold_in`, its mixing weight chosen from its own last ``recent``
   labelled rows.

Scores are those of each retailer's live model, row by row, so the output has the format of the
other modes. River's ``StandardScaler | LogisticRegression`` (``--model river-linear``) is
federated with :func:`fl.client.fold_in_river`, as the worker does; River's baseline is not:
with ``--baseline river`` the federated mode reports the main model only.

For poisoning experiments a :class:`Poisoner` retailer sends its update scaled by ``factor``
away from the current global model (``scale``), or sends the update of a twin model that learns
its rows with flipped labels (``flip``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np

from fl.aggregator import Round, strategy_named
from fl.client import (
    MIX_GRID,
    GlobalModel,
    MixRecord,
    fold_in,
    fold_in_river,
    update_from_model,
    update_from_state,
)
from fl.update import ModelUpdate
from fl.watchlist import SIGNALS, ReplaySettings, replay, replay_new_devices
from fraud.decisions import NEW_DEVICE_MIN_SCORE
from fraud.evaluation import DataError, ModeRunner, Options, Prepared, Step, run_streams
from fraud.models import ModelParams, RiskModel, RiverModel
from fraud.schema import WATCH_FIELDS


@dataclass(frozen=True, slots=True)
class Poisoner:
    """A retailer that poisons its updates: ``scale`` (its change from the global model times
    ``factor``) or ``flip`` (the update of a twin trained on its rows with flipped labels)."""

    retailer: str
    kind: Literal["scale", "flip"]
    factor: float = 100.0


@dataclass(frozen=True, slots=True)
class Settings:
    """How the simulated federation runs (see the module docstring)."""

    sync_every: int = 500
    strategy: str = "fedavg"
    recent: int = 1000
    """Labelled rows each retailer keeps to choose its fold-in mix (and its last
    ``recent // 5`` frauds from before them)."""
    poisoners: tuple[Poisoner, ...] = ()
    mixes: tuple[float, ...] = MIX_GRID
    """The fold-in's candidate mixing weights (one value: a fixed mix, for comparisons)."""

    def __post_init__(self) -> None:
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")
        if self.recent < 1:
            raise ValueError(f"recent must be >= 1, got {self.recent}")
        strategy_named(self.strategy)  # ValueError naming the choices


@dataclass(slots=True)
class RoundLog:
    """What one simulated round did: contributors and each retailer's fold-in mix."""

    round: int
    contributors: tuple[str, ...]
    mixes: dict[str, float]


_Labelled = tuple[int, dict[str, float], bool]


@dataclass(slots=True)
class _Recent:
    """A retailer's last labelled rows, plus its last frauds from further back (frauds are
    rare: a window of 1,000 rows may hold a handful)."""

    rows: deque[_Labelled]
    frauds: deque[_Labelled]

    @classmethod
    def of_size(cls, size: int) -> _Recent:
        return cls(deque(maxlen=size), deque(maxlen=max(size // 5, 1)))

    def add(self, index: int, x: dict[str, float], y: bool) -> None:
        self.rows.append((index, x, y))
        if y:
            self.frauds.append((index, x, y))

    def since(self, index: int) -> list[tuple[dict[str, float], bool]]:
        """The rows from row ``index`` on (those a fold-in before it had not seen)."""
        return [(x, y) for i, x, y in self.rows if i >= index]

    def labelled(self) -> list[tuple[dict[str, float], bool]]:
        start = self.rows[0][0] if self.rows else 0
        older = [(x, y) for i, x, y in self.frauds if i < start]
        return [*older, *((x, y) for _, x, y in self.rows)]


@dataclass(slots=True)
class _Retailer:
    model: RiskModel | RiverModel
    recent: _Recent
    since_update: int = 0
    record: MixRecord = field(default_factory=MixRecord)
    folded_at: int = 0
    twin: RiskModel | None = None
    twin_recent: _Recent | None = None
    twin_record: MixRecord = field(default_factory=MixRecord)
    river_base_n: int = 0
    """A River model's label count at its last fold-in (River counts no examples itself)."""


class Federation:
    """The in-process federation: call :meth:`after_step` after every row (a ``StepHook``)."""

    def __init__(self, settings: Settings, params: ModelParams) -> None:
        self.settings = settings
        self.params = params
        self.strategy = strategy_named(settings.strategy)
        self.poisoners = {p.retailer: p for p in settings.poisoners}
        self.retailers: dict[str, _Retailer] = {}
        self.round = Round(1, None, {}, quorum=1, deadline_s=float(settings.sync_every))
        self.rows = 0
        self.log: list[RoundLog] = []

    def _join(self, step: Step) -> _Retailer:
        if isinstance(step.model, RiverModel) and (not step.model.has_plain_state
                                                   or self.poisoners):
            raise DataError("the federated mode federates the default model and River's "
                            "StandardScaler | LogisticRegression (--model river-linear, "
                            "without poisoners), not another River spec")
        size = self.settings.recent
        member = _Retailer(step.model, _Recent.of_size(size))
        poisoner = self.poisoners.get(step.retailer)
        if poisoner is not None and poisoner.kind == "flip":
            member.twin = RiskModel.from_params(self.params)
            member.twin_recent = _Recent.of_size(size)
        self.retailers[step.retailer] = member
        return member

    def after_step(self, step: Step) -> None:
        """One row was scored and learned at ``step.retailer``: offer, close, fold in."""
        member = self.retailers.get(step.retailer) or self._join(step)
        member.recent.add(self.rows, step.x, step.y)
        if member.twin is not None and member.twin_recent is not None:
            member.twin.learn_one(step.x, not step.y)
            member.twin_recent.add(self.rows, step.x, not step.y)
        member.since_update += 1
        self.rows += 1
        round_ = self.round
        if (member.since_update >= self.settings.sync_every
                and step.retailer not in round_.updates):
            round_.offer(self._update(step.retailer, member), float(self.rows))
            member.since_update = 0
        round_.quorum = len(self.retailers)
        # the deadline: on average every retailer has had sync_every more rows
        round_.deadline_s = float(self.settings.sync_every * len(self.retailers))
        if round_.updates and round_.ready(float(self.rows)):
            self._close()

    def _update(self, name: str, member: _Retailer) -> ModelUpdate:
        number = self.round.number
        poisoner = self.poisoners.get(name)
        if member.twin is not None:
            return update_from_model(member.twin, name, number)
        model = member.model
        if isinstance(model, RiverModel):
            return update_from_state(model.export_state(), name, number,
                                     max(model.n - member.river_base_n, 0))
        update = update_from_model(model, name, number)
        if poisoner is None or poisoner.kind != "scale":
            return update
        current = self.round.current
        scaled = {
            key: (current[key] + poisoner.factor * (values - current[key])
                  if key in current and len(current[key]) == len(values)
                  else poisoner.factor * values)
            for key, values in update.vectors.items()
        }
        return ModelUpdate(name, number, update.examples, scaled)

    def _close(self) -> None:
        published: GlobalModel = self.round.close(self.strategy)
        mixes: dict[str, float] = {}
        for name, member in self.retailers.items():
            model = member.model
            if isinstance(model, RiverModel):  # the worker's River fold-in, as it runs it
                mixes[name] = fold_in_river(model, published, member.recent.labelled())
                member.river_base_n = model.n
            else:
                mixes[name] = fold_in(model, published, member.recent.labelled(),
                                      grid=self.settings.mixes, record=member.record,
                                      fresh=member.recent.since(member.folded_at))
            if member.twin is not None and member.twin_recent is not None:
                fold_in(member.twin, published, member.twin_recent.labelled(),
                        grid=self.settings.mixes, record=member.twin_record,
                        fresh=member.twin_recent.since(member.folded_at))
            member.folded_at = self.rows
        self.log.append(RoundLog(published.round, published.contributors, mixes))
        self.round = self.round.next(published)


def run_federated(data: Prepared, params: ModelParams, options: Options,
                  settings: Settings | None = None) -> dict[str, list[float]]:
    """Each retailer's prequential scores while federating (see the module docstring)."""
    return simulate(data, params, options, settings or Settings())[0]


def simulate(data: Prepared, params: ModelParams, options: Options, settings: Settings
             ) -> tuple[dict[str, list[float]], Federation]:
    """:func:`run_federated` and the :class:`Federation` (its round log) after the run."""
    federation = Federation(settings, params)
    scores = run_streams(data, params, options, federation.after_step)
    # River's baseline learned locally beside us: not a federated result, so not reported
    return {"ours": scores["ours"]}, federation


def runner(settings: Settings) -> ModeRunner:
    """A mode runner for ``settings``: ``evaluate(..., runners={**MODES, "federated":
    runner(settings)})`` (``fraud`` imports nothing of ``fl``; ``qsfraud evaluate`` does this)."""

    def run(data: Prepared, params: ModelParams, options: Options) -> dict[str, list[float]]:
        return run_federated(data, params, options, settings)

    return run


# ----------------------------------------------------------------------------- attack report


@dataclass(frozen=True, slots=True)
class AttackCount:
    """The cross-retailer attack at its later retailers: rows, and rows that passed before
    their retailer first held or blocked one of the campaign's rows."""

    campaigns: int
    rows: int
    passed: int
    never_caught: int


def cross_retailer_attack(rows: Sequence[Mapping[str, Any]], scores: Sequence[float],
                          hold: float = 0.8) -> AttackCount:
    """Counts, for every ``card_cross_retailer`` campaign (one stolen card), the rows at each
    retailer *after the first* that scored below ``hold`` before that retailer's first score
    at or above ``hold`` (a hold or a block).

    ``rows`` are the generator's rows in the evaluation's order (time order; the generator
    writes them so) with ``scenario``, ``payment_instrument`` and ``retailer_id``; ``scores``
    one per row, as a mode's runner returns them.
    """
    if len(rows) != len(scores):
        raise ValueError(f"{len(rows)} rows but {len(scores)} scores")
    campaigns: dict[str, list[tuple[str, float]]] = {}
    for row, score in zip(rows, scores, strict=True):
        if row.get("scenario") == "card_cross_retailer":
            campaigns.setdefault(str(row["payment_instrument"]), []).append(
                (str(row["retailer_id"]), float(score)))
    total = passed = never = 0
    for visits in campaigns.values():
        first = visits[0][0]
        caught: set[str] = set()
        missed: dict[str, int] = {}
        for retailer, score in visits:
            if retailer == first:
                continue
            total += 1
            if retailer in caught:
                continue
            if score >= hold:
                caught.add(retailer)
            else:
                missed[retailer] = missed.get(retailer, 0) + 1
        passed += sum(missed.values())
        never += sum(1 for r in missed if r not in caught)
    return AttackCount(len(campaigns), total, passed, never)


def entity_rows(data: Prepared) -> list[dict[str, str | None]]:
    """Each row's ``payment_instrument`` and ``device_id`` (None: absent or not mapped), in the
    evaluation's order (the order of a runner's scores)."""
    columns: dict[str, list[str | None]] = {}
    order = data.order
    for canon in WATCH_FIELDS.values():
        source = data.plan.mapping.get(canon)
        column = data.columns.get(source) if source is not None else None
        if column is None or column.codes is None:
            columns[canon] = [None] * len(order)
            continue
        codes = np.frombuffer(column.codes, dtype=np.int32)[order].tolist()
        texts = column.texts()
        columns[canon] = [texts[c] if c >= 0 else None for c in codes]
    names = list(columns)
    return [dict(zip(names, values, strict=True))
            for values in zip(*(columns[n] for n in names), strict=True)]


@dataclass(frozen=True, slots=True)
class WatchOutcome:
    """What a watchlist replay changed: rows it raised to hold, by label, and the scores with
    those rows raised to the hold threshold (the decision, as a ranking)."""

    raised_fraud: int
    false_holds: int
    scores: list[float]


def watch_outcome(scores: Sequence[float], hits: Sequence[int], labels: Sequence[bool],
                  hold: float = 0.8, min_score: float = 0.0,
                  new_hits: Sequence[int] | None = None,
                  new_min_score: float = NEW_DEVICE_MIN_SCORE) -> WatchOutcome:
    """Rows below ``hold`` that the watchlist raised (listed, score >= ``min_score``; or, with
    ``new_hits`` from :func:`fl.watchlist.replay_new_devices`, a device new here and listed as
    new elsewhere, score >= ``new_min_score``: the rules of
    :class:`fraud.decisions.Watchlist`): frauds caught, legitimate rows held."""
    news = new_hits if new_hits is not None else [0] * len(scores)
    raised = [s < hold and ((h > 0 and s >= min_score) or (n > 0 and s >= new_min_score))
              for s, h, n in zip(scores, hits, news, strict=True)]
    return WatchOutcome(
        sum(1 for r, y in zip(raised, labels, strict=True) if r and y),
        sum(1 for r, y in zip(raised, labels, strict=True) if r and not y),
        [hold if r else float(s) for r, s in zip(raised, scores, strict=True)])


def honest_change(before: Mapping[str, Any], after: Mapping[str, Any],
                  exclude: Sequence[str]) -> float:
    """The largest absolute change of average precision over the retailers not in ``exclude``
    between two results of :func:`fraud.evaluation.summarize`."""
    changes = [abs(after["retailers"][name]["average_precision"]
                   - before["retailers"][name]["average_precision"])
               for name in before["retailers"] if name not in exclude]
    return float(np.max(changes)) if changes else 0.0


# ----------------------------------------------------------------------------- experiments


WATCH_KEY: Final = bytes(range(32))
"""The simulation's consortium key (any key gives the same counts, barring hash collisions)."""


def _attack_dict(attack: AttackCount) -> dict[str, int]:
    return {"campaigns": attack.campaigns, "rows": attack.rows, "passed": attack.passed,
            "never_caught": attack.never_caught}


def _table(result: Mapping[str, Any]) -> dict[str, float | None]:
    def ap(report: Mapping[str, Any]) -> float | None:
        value = report["average_precision"]
        return None if value is None else round(value, 4)  # None: no fraud there

    return {"overall": ap(result["overall"]),
            **{name: ap(rep) for name, rep in result["retailers"].items()}}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fl.simulation attack|poison --data gen.csv``: the generator experiments of
    fl/README.md ("Federated simulation"), one JSON line per run."""
    import argparse
    import json

    from fraud.evaluation import MODES, load, read_table, summarize

    parser = argparse.ArgumentParser(prog="python -m fl.simulation")
    parser.add_argument("experiment", choices=["attack", "poison"])
    parser.add_argument("--data", required=True, help="a generator CSV (qsfraud generate)")
    parser.add_argument("--label-delay", type=float, default=604800.0)
    parser.add_argument("--sync-every", type=int, default=500)
    parser.add_argument("--poisoner", default="retailer_1")
    parser.add_argument("--watch", nargs="*", default=["hold", "review"], choices=SIGNALS,
                        help="attack: replay the watchlist with these report signals")
    parser.add_argument("--exchange-every", type=float, default=300.0,
                        help="attack: seconds between watchlist exchanges")
    parser.add_argument("--watch-min-score", type=float, default=0.0,
                        help="attack: the watchlist holds listed rows scoring at least this")
    parser.add_argument("--report-at", type=float, default=None,
                        help="attack: report rows scoring at least this (default: the signal's "
                             "band)")
    parser.add_argument("--new-devices", action="store_true",
                        help="attack: also report devices new at a retailer and hold a row "
                             "whose device is new here and listed as new elsewhere")
    parser.add_argument("--new-min-score", type=float, default=NEW_DEVICE_MIN_SCORE,
                        help="attack: ... if the own model scores it at least this")
    args = parser.parse_args(argv)
    data = load(args.data)
    entities = entity_rows(data)
    params = ModelParams()
    options = Options(label_delay=args.label_delay)
    if args.experiment == "attack":
        rows = read_table(args.data)
        for mode in ("local", "central", "federated"):
            if mode == "federated":
                scores, federation = simulate(data, params, options,
                                              Settings(sync_every=args.sync_every))
                extra: dict[str, Any] = {"rounds": len(federation.log)}
            else:
                scores, extra = MODES[mode](data, params, options), {}
            attack = cross_retailer_attack(rows, scores["ours"])
            print(json.dumps({"mode": mode, "ap": _table(summarize(data, scores["ours"])),
                              "attack": _attack_dict(attack), **extra}), flush=True)
            if mode == "central":
                continue  # one model over every retailer: nothing to exchange
            for signal in args.watch:
                watch = ReplaySettings(signal=signal, exchange_every_s=args.exchange_every,
                                       label_delay_s=args.label_delay,
                                       report_at=args.report_at)
                hits = replay(data.times.tolist(), data.retailers, entities, scores["ours"],
                              data.labels.tolist(), watch, WATCH_KEY)
                new_hits = replay_new_devices(
                    data.times.tolist(), data.retailers, entities, WATCH_KEY,
                    exchange_every_s=args.exchange_every) if args.new_devices else None
                outcome = watch_outcome(scores["ours"], hits, data.labels.tolist(),
                                        min_score=args.watch_min_score, new_hits=new_hits,
                                        new_min_score=args.new_min_score)
                attack = cross_retailer_attack(rows, outcome.scores)
                print(json.dumps({"mode": f"{mode}+watchlist", "signal": signal,
                                  "exchange_every_s": args.exchange_every,
                                  "min_score": args.watch_min_score,
                                  "report_at": args.report_at,
                                  "new_devices": args.new_devices,
                                  "new_min_score": args.new_min_score,
                                  "ap": _table(summarize(data, outcome.scores)),
                                  "attack": _attack_dict(attack),
                                  "raised_fraud": outcome.raised_fraud,
                                  "false_holds": outcome.false_holds}), flush=True)
        return 0
    for strategy in ("fedavg", "fedmedian", "fedtrimmedavg"):
        honest = summarize(data, run_federated(
            data, params, options, Settings(sync_every=args.sync_every, strategy=strategy))["ours"])
        print(json.dumps({"strategy": strategy, "poison": None, "ap": _table(honest)}),
              flush=True)
        for kind in ("scale", "flip"):
            poisoner = Poisoner(args.poisoner, "scale" if kind == "scale" else "flip")
            poisoned = summarize(data, run_federated(
                data, params, options, Settings(sync_every=args.sync_every, strategy=strategy,
                                                poisoners=(poisoner,)))["ours"])
            print(json.dumps({"strategy": strategy, "poison": kind, "ap": _table(poisoned),
                              "honest_max_change": round(
                                  honest_change(honest, poisoned, (args.poisoner,)), 4)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
