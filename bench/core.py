"""Per-event cost of the fraud core: streaming features + score + learn of the default model.

Replays generated transactions (3 retailers) through :class:`fraud.features.FeatureExtractor`
and :class:`fraud.models.RiskModel`, then runs a bare River ``StandardScaler |
LogisticRegression`` (predict + learn) on the same feature vectors in the same process.
Each figure is the best of several passes. Last line: JSON with ``us_per_event`` (ours:
features + score + learn), ``river_us_per_event`` (the same features + River's score + learn)
and ``ratio`` (ours / River; below 1 means faster).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from fraud.features import FeatureExtractor
from fraud.generator import GeneratorConfig, generate
from fraud.models import RiskModel
from fraud.schema import Transaction


def best_of(passes: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=12000)
    parser.add_argument("--passes", type=int, default=4)
    args = parser.parse_args()

    rows = []
    for row in generate(GeneratorConfig(retailers=3, days=30, tx_per_day=400, seed=11)):
        rows.append(row)
        if len(rows) >= args.events:
            break
    txs = [Transaction.from_dict({k: v for k, v in row.items()
                                  if k not in ("is_fraud", "scenario", "label_source",
                                               "labelled_at")}) for row in rows]
    labels = [bool(row["is_fraud"]) for row in rows]
    n = len(txs)

    vectors: list[dict[str, float]] = []

    def features() -> None:
        fx, state = FeatureExtractor(), {}
        vectors[:] = [fx.extract(tx, state) for tx in txs]

    def ours_all() -> None:
        fx, state, model = FeatureExtractor(), {}, RiskModel()
        extract, score, learn = fx.extract, model.score_one, model.learn_one
        for tx, y in zip(txs, labels, strict=True):
            x = extract(tx, state)
            score(x)
            learn(x, y)

    def ours_model() -> None:
        model = RiskModel()
        for x, y in zip(vectors, labels, strict=True):
            model.score_one(x)
            model.learn_one(x, y)

    def ours_batch() -> None:
        fx, state, model = FeatureExtractor(), {}, RiskModel()
        for i in range(0, n, 256):
            xs = fx.extract_many(txs[i:i + 256], state)
            model.score_many(xs)
            model.learn_many(xs, labels[i:i + 256])

    from river import linear_model, preprocessing

    def river_model() -> None:
        model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
        for x, y in zip(vectors, labels, strict=True):
            model.predict_proba_one(x)
            model.learn_one(x, y)

    # round-robin passes so that every variant sees the same background load; keep the best
    variants = {"feat": features, "model": ours_model, "total": ours_all, "batch": ours_batch,
                "river": river_model}
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.passes):
        for name, fn in variants.items():
            best[name] = min(best[name], best_of(1, fn) / n * 1e6)
    feat, model, total, batch, river = (best[k] for k in variants)
    river_total = feat + river
    print(f"events: {n} ({sum(labels)} frauds), features per event: {len(vectors[0])}")
    print(f"features (extract):                  {feat:7.1f} us/event")
    print(f"RiskModel score + learn:             {model:7.1f} us/event")
    print(f"features + score + learn:            {total:7.1f} us/event "
          f"(~{1e6 / total:,.0f} events/s on one core)")
    print(f"  same, batch API (256 per call):    {batch:7.1f} us/event")
    print(f"River StandardScaler|LogReg:         {river:7.1f} us/event (score + learn)")
    print(f"features + River score + learn:      {river_total:7.1f} us/event")
    print(json.dumps({
        "us_per_event": round(total, 2),
        "river_us_per_event": round(river_total, 2),
        "ratio": round(total / river_total, 3),
        "features_us": round(feat, 2),
        "model_us": round(model, 2),
        "river_model_us": round(river, 2),
        "batch_us_per_event": round(batch, 2),
        "n_features": len(vectors[0]),
        "events": n,
    }))


if __name__ == "__main__":
    main()
