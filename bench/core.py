"""Per-event cost of the fraud core: streaming features + score + learn of the default model.

Replays generated transactions (3 retailers) through :class:`fraud.features.FeatureExtractor`
and :class:`fraud.models.RiskModel` (the public dict API the streams worker uses), and through
a bare River ``StandardScaler | LogisticRegression`` (``predict_proba_one`` + ``learn_one``)
on the same feature dicts, in the same process.

Every variant runs once per round, round-robin, for ``--passes`` rounds, so all see the same
background load; a figure is the minimum over the rounds (the median is printed too). The
setup data (generated rows, transactions) is frozen out of the garbage collector first:
otherwise each full collection re-walks those ~10^5 objects and charges it to whichever
variant happens to allocate at that moment (the state of the feature loop), which is why the
combined loop used to cost more than its parts measured separately.

Last line: JSON with ``us_per_event`` (ours: features + score + learn in one loop),
``river_us_per_event`` (the same loop with River's score + learn instead of ours) and
``ratio`` (ours / River; below 1 means faster), plus the breakdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable

from fraud.features import FeatureExtractor
from fraud.generator import GeneratorConfig, generate
from fraud.models import RiskModel
from fraud.schema import Transaction


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=12000)
    parser.add_argument("--passes", type=int, default=5)
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
    fx0 = FeatureExtractor()
    state0: dict[str, object] = {}
    vectors: list[dict[str, float]] = [fx0.extract(tx, state0) for tx in txs]
    del fx0, state0

    from river import linear_model, preprocessing

    def river_pipeline() -> object:
        return preprocessing.StandardScaler() | linear_model.LogisticRegression()

    def features() -> None:
        fx = FeatureExtractor()
        state: dict[str, object] = {}
        extract = fx.extract
        for tx in txs:
            extract(tx, state)

    def ours_model() -> None:  # score + learn on precomputed vectors
        model = RiskModel()
        score, learn = model.score_one, model.learn_one
        for x, y in zip(vectors, labels, strict=True):
            score(x, True)  # as the worker: predict, then the unsupervised step
            learn(x, y)

    def ours_learn() -> None:  # learn alone (its cost does not depend on scoring)
        learn = RiskModel().learn_one
        for x, y in zip(vectors, labels, strict=True):
            learn(x, y)

    def ours_all() -> None:  # the headline: features + score + learn, one event at a time
        fx, model = FeatureExtractor(), RiskModel()
        state: dict[str, object] = {}
        extract, score, learn = fx.extract, model.score_one, model.learn_one
        for tx, y in zip(txs, labels, strict=True):
            x = extract(tx, state)
            score(x, True)
            learn(x, y)

    def ours_batch() -> None:
        fx, model = FeatureExtractor(), RiskModel()
        state: dict[str, object] = {}
        for i in range(0, n, 256):
            xs = fx.extract_many(txs[i:i + 256], state)
            model.score_many(xs, observe=True)
            model.learn_many(xs, labels[i:i + 256])

    def river_model() -> None:  # River score + learn on the same precomputed vectors
        model = river_pipeline()
        score, learn = model.predict_proba_one, model.learn_one  # type: ignore[attr-defined]
        for x, y in zip(vectors, labels, strict=True):
            score(x)
            learn(x, y)

    def river_all() -> None:  # our features + River score + learn, the same loop as ours_all
        fx, model = FeatureExtractor(), river_pipeline()
        state: dict[str, object] = {}
        extract = fx.extract
        score, learn = model.predict_proba_one, model.learn_one  # type: ignore[attr-defined]
        for tx, y in zip(txs, labels, strict=True):
            x = extract(tx, state)
            score(x)
            learn(x, y)

    variants = {"features": features, "model": ours_model, "learn": ours_learn,
                "total": ours_all, "batch": ours_batch, "river_model": river_model,
                "river_total": river_all}
    gc.collect()
    gc.freeze()
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.passes):
        for name, fn in variants.items():
            runs[name].append(timed(fn) / n * 1e6)
            gc.collect()  # start every variant with an empty young generation
    best = {k: min(v) for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in runs.items()}
    score = best["model"] - best["learn"]

    def line(label: str, key: str, extra: str = "") -> None:
        print(f"{label:44s} {best[key]:7.1f} us/event (median {med[key]:6.1f}){extra}")

    print(f"events: {n} ({sum(labels)} frauds), features per event: {len(vectors[0])}, "
          f"best of {args.passes} round-robin passes")
    line("features (extract):", "features")
    print(f"{'RiskModel score (model - learn):':44s} {score:7.1f} us/event")
    line("RiskModel learn:", "learn")
    line("RiskModel score + learn:", "model")
    line("features + score + learn:", "total", f"  ~{1e6 / best['total']:,.0f} events/s")
    line("  same, batch API (256 per call):", "batch")
    line("River StandardScaler|LogReg score + learn:", "river_model")
    line("features + River score + learn:", "river_total")
    print(json.dumps({
        "us_per_event": round(best["total"], 2),
        "river_us_per_event": round(best["river_total"], 2),
        "ratio": round(best["total"] / best["river_total"], 3),
        "features_us": round(best["features"], 2),
        "score_us": round(score, 2),
        "learn_us": round(best["learn"], 2),
        "model_us": round(best["model"], 2),
        "river_model_us": round(best["river_model"], 2),
        "model_ratio": round(best["model"] / best["river_model"], 3),
        "batch_us_per_event": round(best["batch"], 2),
        "n_features": len(vectors[0]),
        "events": n,
    }))


if __name__ == "__main__":
    main()
