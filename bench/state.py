"""``qsfraud bench state``: a worker's memory and changelogs stay flat once the horizon passes.

Streams transactions whose customer, payment instrument, device and IP are all new (four
new entities each, ``--entities`` in all) through one real worker (``python -m qsfraud
worker``) on real Kafka. Event time runs fast: the run spans ``--passes`` state horizons
(``--horizon``, 2 days by default) of ``occurred_at``, so the worker's state expires, and
its changelogs get tombstones, a few times over. The producer keeps at most
``--max-lag`` transactions ahead of the decisions, so the rate is the one the worker held.

Every few seconds: the worker's RSS and the bytes of the two changelog topics in the
broker's log directories. The changelogs are pre-created with short segments and eager
cleaning (``segment.ms``, ``min.cleanable.dirty.ratio``, ``delete.retention.ms``) so that
the log cleaner compacts them (and drops the tombstones) during the run. "first" is the
sample when the decided transactions' event time first passes one horizon, "last" the one
at the end (after ``--settle-seconds`` for the cleaner).

The last line is JSON: ``{"entities", "transactions", "rss_mb_first", "rss_mb_last",
"changelog_mb_first", "changelog_mb_last", "tx_per_s", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qsfraud.worker_process import WorkerProcess  # noqa: E402
from streams.settings import FEATURES_TABLE, SCORED_TABLE, WorkerSettings  # noqa: E402
from streams.topics import TopicSpec, ensure_topics, worker_topics  # noqa: E402

RETAILER = "bench_state"
DAY = 86400.0
EAGER_COMPACTION = {
    "cleanup.policy": "compact",
    "segment.ms": "10000",
    "segment.bytes": str(16 * 1024 * 1024),
    "min.cleanable.dirty.ratio": "0.01",
    "delete.retention.ms": "1000",
    "min.compaction.lag.ms": "0",
}
"""Changelog topic configs for the run: a segment rolls every 10 s (the active one is never
cleaned) and the cleaner takes any dirty share, dropping tombstones a second later."""


def transaction(i: int, at: float) -> dict[str, Any]:
    """Transaction ``i``: every entity in it is new."""
    return {"tx_id": f"t{i:010d}", "retailer_id": RETAILER, "amount": 5.0 + (i * 37) % 400,
            "customer_id": f"c{i:010d}", "payment_instrument": f"p{i:010d}",
            "device_id": f"d{i:010d}", "ip": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            "occurred_at": at, "channel": "web", "item_count": 1 + i % 3}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def changelog_mb(log_dirs: Path, topics: list[str]) -> float:
    """Disk the topics' partitions take (all segments and indexes), in MB: blocks
    allocated, not file sizes (the broker preallocates 10 MB sparse index files)."""
    total = 0
    for d in log_dirs.iterdir():
        if d.is_dir() and d.name.rsplit("-", 1)[0] in topics:
            total += sum(f.stat().st_blocks * 512 for f in d.iterdir() if f.is_file())
    return total / 1e6


class DecisionCounter(threading.Thread):
    """Counts the decisions written (duplicates included: at-least-once redeliveries)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.count = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        consumer = Consumer({"bootstrap.servers": self.bootstrap,
                             "group.id": f"bench-state-{time.time_ns()}",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False})
        consumer.subscribe([self.topic])
        while not self.stop_flag.is_set():
            self.count += sum(1 for m in consumer.consume(5000, 0.2) if m.error() is None)
        consumer.close()


def run(args: argparse.Namespace, bootstrap: str, log_dirs: Path, tmp: Path) -> dict:
    n = args.entities // 4
    horizon = args.horizon
    span = args.passes * horizon
    step = span / n
    # event time ends a day before the wall clock (the worker's clock may not run ahead of it)
    start = time.time() - span - DAY
    settings = WorkerSettings(RETAILER, bootstrap, state_horizon_s=horizon,
                              scored_ttl_s=args.label_delay)
    changelogs = [settings.changelog_topic(FEATURES_TABLE), settings.changelog_topic(SCORED_TABLE)]
    ensure_topics(bootstrap, [TopicSpec(name, settings.partitions, EAGER_COMPACTION)
                              for name in changelogs])
    ensure_topics(bootstrap, worker_topics(settings))
    worker = WorkerProcess(bootstrap, RETAILER, tmp, "--loglevel", "warn",
                           "--trust", str(tmp / "none.json"),
                           "--state-horizon", str(horizon), "--scored-ttl", str(args.label_delay))
    worker.start(wait=True)
    assert worker.proc is not None
    pid = worker.proc.pid
    counter = DecisionCounter(bootstrap, settings.decisions_topic)
    counter.start()
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                         "linger.ms": 5, "queue.buffering.max.messages": 1_000_000})
    samples: list[dict[str, float]] = []
    first: dict[str, float] | None = None
    horizon_tx = int(horizon / step)

    def sample() -> dict[str, float]:
        s = {"t": time.monotonic(), "decided": counter.count, "rss_mb": rss_mb(pid),
             "changelog_mb": changelog_mb(log_dirs, changelogs)}
        samples.append(s)
        print(f"  {s['decided']:>9,} decided ({s['decided'] / max(1, horizon_tx):.2f} "
              f"horizons)  RSS {s['rss_mb']:7.1f} MB  changelogs {s['changelog_mb']:7.1f} MB",
              flush=True)
        return s

    began = time.monotonic()
    next_sample = began
    produced = 0
    try:
        while produced < n:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"the worker exited; see {worker.log_path}")
            if produced - counter.count < args.max_lag:
                for i in range(produced, min(n, produced + 2000)):
                    tx = transaction(i, start + i * step)
                    while True:
                        try:
                            producer.produce(settings.transactions_topic,
                                             key=tx["customer_id"], value=json.dumps(tx).encode())
                            break
                        except BufferError:
                            producer.poll(0.05)
                produced = min(n, produced + 2000)
                producer.poll(0)
            else:
                time.sleep(0.05)
            if time.monotonic() >= next_sample:
                next_sample += args.sample_seconds
                s = sample()
                if first is None and s["decided"] >= horizon_tx:
                    first = s
        producer.flush(60)
        deadline = time.monotonic() + 600
        while counter.count < n and time.monotonic() < deadline:
            time.sleep(0.5)
        done = time.monotonic()
        decided = counter.count
        if first is None:
            first = sample()
        settle_until = time.monotonic() + args.settle_seconds
        while time.monotonic() < settle_until:
            time.sleep(min(args.sample_seconds, max(0.0, settle_until - time.monotonic())))
            sample()
        last = sample()
        metrics = worker.metrics()
    finally:
        counter.stop_flag.set()
        worker.stop()
        counter.join()
    gauges = {line.split("{")[0].split(" ")[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines()
              if line.startswith(("qsfraud_feature_entities", "qsfraud_scored_entries"))}
    expired = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("qsfraud_expired_total"))
    rss = [s["rss_mb"] for s in samples if s["t"] >= first["t"]]
    return {
        "entities": 4 * n,
        "transactions": n,
        "decided": decided,
        "horizon_s": horizon,
        "passes": args.passes,
        "rss_mb_first": round(first["rss_mb"], 1),
        "rss_mb_last": round(last["rss_mb"], 1),
        "rss_mb_max_after_first": round(max(rss), 1),
        "changelog_mb_first": round(first["changelog_mb"], 1),
        "changelog_mb_last": round(last["changelog_mb"], 1),
        "changelog_mb_max_after_first": round(
            max(s["changelog_mb"] for s in samples if s["t"] >= first["t"]), 1),
        "feature_entities_last": gauges.get("qsfraud_feature_entities"),
        "scored_entries_last": gauges.get("qsfraud_scored_entries"),
        "expired": expired,
        "tx_per_s": round(decided / max(1e-9, done - began), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=5_000_000,
                        help="distinct entities in all (four per transaction)")
    parser.add_argument("--horizon", type=float, default=2 * DAY, metavar="SECONDS",
                        help="the worker's --state-horizon (event time)")
    parser.add_argument("--label-delay", type=float, default=DAY, metavar="SECONDS",
                        help="the worker's --scored-ttl")
    parser.add_argument("--passes", type=float, default=4.0,
                        help="how many horizons of event time the run spans")
    parser.add_argument("--max-lag", type=int, default=20_000,
                        help="transactions produced ahead of the decisions at most")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--settle-seconds", type=float, default=60.0,
                        help="after the last decision, time for the log cleaner")
    parser.add_argument("--bootstrap", help="use this Kafka instead of an ephemeral one "
                        "(then --log-dirs is its log.dirs)")
    parser.add_argument("--log-dirs", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qsfraud-bench-state-") as tmpdir:
        tmp = Path(tmpdir)
        if args.bootstrap:
            if args.log_dirs is None:
                parser.error("--bootstrap needs --log-dirs (the broker's log.dirs)")
            result = run(args, args.bootstrap, args.log_dirs, tmp)
        else:
            from qsfraud.stack import ephemeral_kafka

            with ephemeral_kafka(tmp) as kafka:
                result = run(args, kafka.bootstrap, kafka.log_dirs, tmp)
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
