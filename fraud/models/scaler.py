"""Running standardisation whose statistics merge exactly.

State is plain data (``{"counts", "means", "vars"}``, population variances, like River's
``preprocessing.StandardScaler``). :func:`merge_scalers` combines any number of them with
Chan's parallel formula: the result equals one scaler trained on the union of their data, and it
does not depend on the order of its inputs (sums are exactly rounded with ``math.fsum``).

>>> a, b, both = RunningScaler(), RunningScaler(), RunningScaler()
>>> for v in (1.0, 2.0, 4.0):
...     a.learn_one({"x": v}); both.learn_one({"x": v})
>>> for v in (8.0, 16.0):
...     b.learn_one({"x": v}); both.learn_one({"x": v})
>>> merged = RunningScaler.from_dict(merge_scalers([a.to_dict(), b.to_dict()]))
>>> round(merged.mean("x"), 12), round(merged.var("x"), 12)
(6.2, 29.76)
>>> round(both.mean("x"), 12), round(both.var("x"), 12)
(6.2, 29.76)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# One feature's statistics: [count, mean, m2 (sum of squared deviations), 1/std or 0]
Stat = list[float]


class RunningScaler:
    """Welford mean/variance per feature; ``transform_one`` gives z-scores clipped to ``clip``."""

    __slots__ = ("clip", "stats")

    def __init__(self, clip: float = 6.0) -> None:
        self.clip = clip
        self.stats: dict[str, Stat] = {}

    def learn_one(self, x: Mapping[str, float]) -> None:
        stats = self.stats
        for k, v in x.items():
            s = stats.get(k)
            if s is None:
                stats[k] = [1.0, v, 0.0, 0.0]
                continue
            n = s[0] + 1.0
            d = v - s[1]
            s[0] = n
            s[1] += d / n
            s[2] += d * (v - s[1])
            var = s[2] / n  # 0 also when a tiny m2 underflows: no division by zero
            s[3] = 1.0 / math.sqrt(var) if var > 0.0 else 0.0

    def transform_one(self, x: Mapping[str, float]) -> dict[str, float]:
        stats, clip = self.stats, self.clip
        out: dict[str, float] = {}
        for k, v in x.items():
            s = stats.get(k)
            z = (v - s[1]) * s[3] if s is not None else 0.0
            out[k] = clip if z > clip else -clip if z < -clip else z
        return out

    def count(self, key: str) -> float:
        s = self.stats.get(key)
        return s[0] if s else 0.0

    def mean(self, key: str) -> float:
        s = self.stats.get(key)
        return s[1] if s else 0.0

    def var(self, key: str) -> float:
        s = self.stats.get(key)
        return s[2] / s[0] if s and s[0] else 0.0

    def to_dict(self) -> dict[str, dict[str, float]]:
        """Plain data: ``{"counts": {...}, "means": {...}, "vars": {...}}``."""
        st = self.stats
        return {
            "counts": {k: s[0] for k, s in st.items()},
            "means": {k: s[1] for k, s in st.items()},
            "vars": {k: s[2] / s[0] if s[0] else 0.0 for k, s in st.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], clip: float = 6.0) -> RunningScaler:
        scaler = cls(clip)
        counts, means, variances = d["counts"], d["means"], d["vars"]
        for k, n in counts.items():
            n = float(n)
            if n <= 0.0:
                continue
            var = float(variances.get(k, 0.0))
            m2 = var * n
            inv = 1.0 / math.sqrt(var) if var > 0 else 0.0
            scaler.stats[str(k)] = [n, float(means[k]), m2, inv]
        return scaler


def merge_scalers(states: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Exact, order-independent merge of :meth:`RunningScaler.to_dict` states.

    Count-weighted means; variances by Chan's formula. A feature seen by one input is copied.
    """
    keys: dict[str, None] = {}
    for st in states:
        for k, n in st["counts"].items():
            if n > 0:
                keys[k] = None
    counts: dict[str, float] = {}
    means: dict[str, float] = {}
    variances: dict[str, float] = {}
    for k in sorted(keys):
        parts = [
            (float(st["counts"][k]), float(st["means"][k]), float(st["vars"][k]))
            for st in states
            if st["counts"].get(k, 0) > 0
        ]
        if len(parts) == 1:
            counts[k], means[k], variances[k] = parts[0]
            continue
        n = math.fsum(p[0] for p in parts)
        mean = math.fsum(p[0] * p[1] for p in parts) / n
        m2 = math.fsum([*(p[0] * p[2] for p in parts), *(p[0] * (p[1] - mean) ** 2 for p in parts)])
        counts[k], means[k], variances[k] = n, mean, m2 / n
    return {"counts": counts, "means": means, "vars": variances}


def subtract_scaler(
    total: Mapping[str, Any], base: Mapping[str, Any]
) -> dict[str, dict[str, float]]:
    """The statistics of the data in ``total`` but not in ``base``, when ``total`` is ``base``
    plus more data: Chan's formula solved for the missing part (exact up to rounding).

    ``merge_scalers([base, subtract_scaler(total, base)])`` equals ``total``. A feature with no
    new data is left out.

    >>> a, both = RunningScaler(), RunningScaler()
    >>> for v in (1.0, 2.0, 4.0):
    ...     a.learn_one({"x": v}); both.learn_one({"x": v})
    >>> for v in (8.0, 16.0):
    ...     both.learn_one({"x": v})
    >>> d = subtract_scaler(both.to_dict(), a.to_dict())
    >>> d["counts"]["x"], round(d["means"]["x"], 12), round(d["vars"]["x"], 12)
    (2.0, 12.0, 16.0)
    """
    counts: dict[str, float] = {}
    means: dict[str, float] = {}
    variances: dict[str, float] = {}
    for k, n in total["counts"].items():
        n = float(n)
        nb = float(base["counts"].get(k, 0.0))
        nd = n - nb
        if nd <= 0.0:
            continue
        mean, var = float(total["means"][k]), float(total["vars"][k])
        if nb <= 0.0:
            counts[k], means[k], variances[k] = n, mean, var
            continue
        mb, vb = float(base["means"][k]), float(base["vars"][k])
        md = (n * mean - nb * mb) / nd
        # m2 = m2_b + m2_d + n_b (m_b - m)^2 + n_d (m_d - m)^2
        m2d = n * var - nb * vb - nb * (mb - mean) ** 2 - nd * (md - mean) ** 2
        counts[k], means[k], variances[k] = nd, md, max(m2d, 0.0) / nd
    return {"counts": counts, "means": means, "vars": variances}
