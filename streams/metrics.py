"""Worker metrics in the Prometheus text exposition format (served at ``/metrics``).

>>> m = WorkerMetrics("acme")
>>> m.count("qsfraud_decisions_total", 2, action="allow")
>>> m.observe_latency(0.004)
>>> m.gauge("qsfraud_model_info", 1, version="local+0")
>>> text = m.render()
>>> 'qsfraud_decisions_total{retailer="acme",action="allow"} 2' in text
True
>>> 'qsfraud_decision_latency_seconds_bucket{retailer="acme",le="0.005"} 1' in text
True
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Final

LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                          2.5, 5.0, 10.0)
HELP: Final = {
    "qsfraud_transactions_total": ("counter", "Transaction records consumed"),
    "qsfraud_decisions_total": ("counter", "Decisions written, by action"),
    "qsfraud_duplicates_total": ("counter", "Redelivered transactions answered from the "
                                 "dedup table"),
    "qsfraud_dead_letters_total": ("counter", "Bad input records sent to the DLQ"),
    "qsfraud_skipped_total": ("counter", "CDC deletes skipped"),
    "qsfraud_refetched_total": ("counter", "Records faust skipped, read again directly"),
    "qsfraud_gap_reads_total": ("counter", "Direct reads of offsets faust skipped, by topic"),
    "qsfraud_labels_total": ("counter", "Labels consumed, by outcome"),
    "qsfraud_config_total": ("counter", "Config records, by outcome"),
    "qsfraud_checkpoints_total": ("counter", "Model checkpoints written"),
    "qsfraud_throughput_tx_per_second": ("gauge", "Transactions per second over the last "
                                         "10 s"),
    "qsfraud_consumer_lag": ("gauge", "Records not yet processed, by topic partition"),
    "qsfraud_model_info": ("gauge", "The model version in use"),
    "qsfraud_config_version": ("gauge", "The applied config version"),
    "qsfraud_scored_entries": ("gauge", "Entries in the dedup/feature store"),
    "qsfraud_decision_latency_seconds": ("histogram", "Record produced -> decision made"),
    "qsfraud_fl_updates_total": ("counter", "Federated updates sent (one a round at most)"),
    "qsfraud_fl_globals_total": ("counter", "Global models, by outcome (applied, refused) "
                                 "and reason"),
    "qsfraud_fl_global_round": ("gauge", "Round of the global model folded in last"),
    "qsfraud_fl_global_info": ("gauge", "Version of the global model folded in last"),
    "qsfraud_fl_mix": ("gauge", "Weight of the global model in the last fold-in"),
}
ONE_SERIES: Final = frozenset({"qsfraud_model_info", "qsfraud_fl_global_info"})
"""Gauges whose label is the current value: a new one replaces the old series."""


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{v.replace(chr(92), "/").replace(chr(34), chr(39))}"'
                     for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class WorkerMetrics:
    """Counters, gauges and one latency histogram; thread-safe; ``render`` for scraping."""

    def __init__(self, retailer: str) -> None:
        self.retailer = retailer
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0
        self._rate: list[tuple[float, int]] = []
        self.collectors: list[Callable[[WorkerMetrics], None]] = []

    def _key(self, name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
        return name, (("retailer", self.retailer), *sorted(labels.items()))

    def count(self, name: str, value: float = 1, **labels: str) -> None:
        key = self._key(name, labels)
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def gauge(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            if name in ONE_SERIES:  # one series: the current version
                self._gauges = {k: v for k, v in self._gauges.items() if k[0] != name}
            self._gauges[self._key(name, labels)] = value

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            self._buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._latency_sum += seconds
            self._latency_count += 1

    def observe_latencies(self, values: Iterable[float]) -> None:
        with self._lock:
            buckets = self._buckets
            for seconds in values:
                buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
                self._latency_sum += seconds
                self._latency_count += 1

    def processed(self, n: int, now: float | None = None) -> None:
        """Note ``n`` transactions processed now (for the throughput gauge)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._rate.append((now, n))
            while self._rate and self._rate[0][0] < now - 10.0:
                self._rate.pop(0)

    def throughput(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [(t, n) for t, n in self._rate if t >= now - 10.0]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1.0)
        return sum(n for _, n in recent) / span

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        for collect in list(self.collectors):
            collect(self)
        self.gauge("qsfraud_throughput_tx_per_second", round(self.throughput(), 3))
        with self._lock:
            series: dict[str, list[str]] = {}
            for (name, labels), value in [*self._counters.items(), *self._gauges.items()]:
                series.setdefault(name, []).append(f"{name}{_labels(labels)} {value:g}")
            base = (("retailer", self.retailer),)
            cumulative = 0
            lines = []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self._buckets, strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append("qsfraud_decision_latency_seconds_bucket"
                             f"{_labels((*base, ('le', le)))} {cumulative}")
            lines.append(f"qsfraud_decision_latency_seconds_sum{_labels(base)} "
                         f"{self._latency_sum:g}")
            lines.append(f"qsfraud_decision_latency_seconds_count{_labels(base)} "
                         f"{self._latency_count}")
            series["qsfraud_decision_latency_seconds"] = lines
        out = []
        for name in sorted(series):
            kind, text = HELP.get(name, ("untyped", name))
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(series[name])
        return "\n".join(out) + "\n"
