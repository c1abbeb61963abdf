"""The workers' ``/metrics`` pages (Prometheus text), scraped in the background for the charts.

>>> text = '''# TYPE qsfraud_consumer_lag gauge
... qsfraud_consumer_lag{retailer="acme",topic="acme.transactions",partition="0"} 7
... qsfraud_consumer_lag{retailer="acme",topic="acme.transactions",partition="1"} 3
... qsfraud_throughput_tx_per_second{retailer="acme"} 12.5
... qsfraud_config_version{retailer="acme"} 4'''
>>> s = summarize(parse_prometheus(text), "http://w:6066/metrics", at=1.0)
>>> s.retailer, s.lag, s.throughput, s.config_version
('acme', 10.0, 12.5, 4)
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

_SAMPLE: Final = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL: Final = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, dict[str, str], float]


def parse_prometheus(text: str) -> list[Sample]:
    """``(name, labels, value)`` of every sample line; comments and junk are skipped.

    >>> parse_prometheus('a{x="1"} 2\\n# HELP a b\\nb 3e2\\nbad line')
    [('a', {'x': '1'}, 2.0), ('b', {}, 300.0)]
    """
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        out.append((name, dict(_LABEL.findall(labels or "")), number))
    return out


@dataclass(frozen=True)
class WorkerSample:
    """One scrape of one worker, reduced to what the charts and the admin page show."""

    url: str
    at: float
    retailer: str
    lag: float
    throughput: float
    config_version: int | None
    error: str = ""


def summarize(samples: Sequence[Sample], url: str, at: float) -> WorkerSample:
    retailer, lag, throughput, version = "", 0.0, 0.0, None
    for name, labels, value in samples:
        retailer = retailer or labels.get("retailer", "")
        if name == "qsfraud_consumer_lag" and labels.get("topic", "").endswith(".transactions"):
            lag += value
        elif name == "qsfraud_throughput_tx_per_second":
            throughput = value
        elif name == "qsfraud_config_version":
            version = int(value)
    return WorkerSample(url, at, retailer, lag, throughput, version)


def scrape(url: str, timeout: float = 2.0) -> WorkerSample:
    """One worker's summary, or a sample whose ``error`` says why there is none."""
    now = time.time()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return WorkerSample(url, now, "", 0.0, 0.0, None, str(exc))
    return summarize(parse_prometheus(text), url, now)


class MetricsPoller:
    """Scrapes every URL each ``every_s`` into a capped history (a thread; no URLs: idle)."""

    def __init__(self, urls: Sequence[str], every_s: float = 2.0, keep: int = 1_800) -> None:
        self.urls = tuple(urls)
        self.every_s = every_s
        self._history: deque[WorkerSample] = deque(maxlen=keep * max(1, len(self.urls)))
        self._latest: dict[str, WorkerSample] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ui-metrics", daemon=True)

    def start(self) -> MetricsPoller:
        if self.urls:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for url in self.urls:
                sample = scrape(url)
                with self._lock:
                    self._latest[url] = sample
                    if not sample.error:
                        self._history.append(sample)
            self._stop.wait(self.every_s)

    def history(self) -> list[WorkerSample]:
        with self._lock:
            return list(self._history)

    def latest(self) -> list[WorkerSample]:
        with self._lock:
            return list(self._latest.values())
