"""CDC throughput and commit-to-Kafka latency, per source, on a throw-away local stack.

Run with ``qsfraud bench cdc [--rows N] [--rate R] [--seconds S] [--warmup W] [--sources S]``
(``--sources mongo`` measures one source; the JSON then has only its keys). It starts its own
ephemeral stack (Kafka, MariaDB, the MongoDB server) on free ports and stops it at the end.
For each source (MySQL binlog, MongoDB change stream) ``qsfraud cdc run`` runs as a separate
process, as in production, and a ``read_committed`` consumer in this process measures:

* latency: a writer commits changes at ``--rate`` changes/s for ``--seconds`` (MySQL: one row
  per transaction; MongoDB: what is due is inserted with one ``insert_many``, since
  ``insert_one`` alone cannot reach 500/s on SecantusDB; each document is still its own
  change event); latency is the time from the writer's commit call returning to the record
  being readable on Kafka by a ``read_committed`` consumer (p50/p99, ms). The same writer
  runs ``--warmup`` seconds (default 10) before that, not measured: the stack has just been
  started, and a fresh Kafka broker is several times slower to commit transactions until
  its JIT has compiled the hot paths (``--warmup 0`` shows it). A second line splits the
  latency at the envelope's ``produced_at`` (encoded in the reader, right after reading);
* throughput: with the CDC process stopped, ``--rows`` inserts are committed (1,000 per
  transaction); the process is started again and the rate at which it turns that binlog/oplog
  backlog into committed Kafka records is measured from the first backlog record readable to
  the last (``*_changes_per_s``), and from the process's launch to the last
  (``*_changes_per_s_from_launch``: start-up, connecting and positioning included).

The last printed line is a JSON object with ``mysql_changes_per_s``, ``mongo_changes_per_s``,
``mysql_changes_per_s_from_launch``, ``mongo_changes_per_s_from_launch``, ``mysql_p50_ms``,
``mysql_p99_ms``, ``mongo_p50_ms``, ``mongo_p99_ms``.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mysql.connector
import pymongo
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from cdc.kafka_sink import DEFAULT_OFFSETS_TOPIC
from qsfraud.stack import APP_USER, CDC_USER, DATABASE, Stack, StackConfig

REPO = Path(__file__).resolve().parents[1]
MAPPING = """
[mapping]
timezone = "UTC"
[mapping.static]
currency = "EUR"
[mapping.fields]
tx_id = "{id_column}"
customer_id = "customer_id"
payment_instrument = "card_hash"
amount = {{ from = "amount", type = "decimal" }}
occurred_at = {{ from = "created_at", type = "datetime" }}
"""


class TopicTimer:
    """Records, per source primary key, when its record became readable (read_committed)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.seen: dict[str, float] = {}
        self.encoded: dict[str, float] = {}  # envelope produced_at: encoded by the reader
        self.track_keys = True
        self.count = 0
        self.first = self.last = 0.0
        self._first_pending = True  # the next record read sets `first`
        self._stop = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{topic}",
                                   "auto.offset.reset": "earliest",
                                   "isolation.level": "read_committed",
                                   "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self._consumer.subscribe([topic])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msgs = self._consumer.consume(10_000, 0.002)  # returns at the timeout or the count
            now = time.time()
            for msg in msgs:
                if msg.error() is not None or msg.value() is None:
                    continue
                if self.track_keys:  # parsing costs CPU the CDC process shares: only for latency
                    record = json.loads(msg.value())
                    pk = record["source"]["pk"]
                    self.seen.setdefault(pk, now)
                    self.encoded.setdefault(pk, float(record["produced_at"]))
                if self._first_pending:
                    self.first, self._first_pending = now, False
                self.count += 1
                self.last = now
        self._consumer.close()

    def restart_window(self) -> None:
        """Let the next record read be the window's first (`first`)."""
        self._first_pending = True

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.count >= n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


class CdcProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qsfraud", "cdc", "run", "--config", str(self.config),
                 "--metrics-interval", "5"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while '"event": "start"' not in self.log.read_bytes()[offset:].decode(errors="replace"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"cdc did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def wait_streaming(self, bootstrap: str, source_id: str, timeout: float = 60.0) -> None:
        """Wait until the process has committed a checkpoint: it streams from there.

        With ``snapshot = "never"`` the start position is taken when the reader starts (in a
        child process, which can take seconds on a busy machine); rows written before it are
        not part of the stream, so the writer must not begin earlier.
        """
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-ckpt-{source_id}",
                             "isolation.level": "read_committed", "enable.auto.commit": False,
                             "auto.offset.reset": "earliest"})
        consumer.assign([TopicPartition(DEFAULT_OFFSETS_TOPIC, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msg = consumer.poll(0.1)
                if msg is not None and msg.error() is None and msg.key() == source_id.encode():
                    return
                if self.proc is not None and self.proc.poll() is not None:
                    break
            raise RuntimeError(f"cdc committed no checkpoint:\n{self.log.read_text()[-3000:]}")
        finally:
            consumer.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(name: str, bootstrap: str, workdir: Path, source_toml: str, id_column: str,
            write_one: Callable[[int], None], write_bulk: Callable[[int, int], None],
            rate: float, seconds: float, rows: int, warmup: float = 0.0,
            write_due: Callable[[list[int]], None] | None = None) -> dict[str, float]:
    retailer = f"bench{name}{int(time.time())}"
    config = workdir / f"{name}.toml"
    config.write_text(
        f'retailer = "{retailer}"\n\n[source]\nid = "{retailer}"\nsnapshot = "never"\n'
        f"{source_toml}\n[kafka]\nbootstrap_servers = \"{bootstrap}\"\npartitions = 3\n"
        + MAPPING.format(id_column=id_column))
    timer = TopicTimer(bootstrap, f"{retailer}.transactions")
    proc = CdcProcess(config, workdir / f"{name}.log")
    try:
        proc.start()
        proc.wait_streaming(bootstrap, retailer)
        # latency: changes at `rate` changes/s; each change is committed on its own (MySQL: one
        # row per transaction); when the writer falls behind schedule it catches up with
        # write_due(ids) (Mongo: one insert_many; each document is still its own change)
        def write_at_rate(first: int, n: int) -> tuple[dict[str, float], float]:
            committed: dict[str, float] = {}
            start = time.monotonic()
            i = 0
            while i < n:
                due = min(n, int((time.monotonic() - start) * rate) + 1, i + 50)
                if due <= i:
                    time.sleep(max(0.0, start + i / rate - time.monotonic()))
                    continue
                ids = range(first + i, first + due)
                if write_due is None:
                    for k in ids:
                        write_one(k)
                        committed[str(k)] = time.time()
                else:
                    write_due(list(ids))
                    now = time.time()  # the call returned: every one of them is committed
                    committed.update((str(k), now) for k in ids)
                i = due
            return committed, n / (time.monotonic() - start)

        # warm-up, not measured: the same load first, so that the figures are those of
        # running services (a broker just started compiles its hot paths for tens of seconds)
        n_warm = int(rate * warmup)
        if n_warm:
            write_at_rate(0, n_warm)
            if not timer.wait_for(n_warm, 60):
                raise RuntimeError(f"{name}: only {timer.count}/{n_warm} warm-up records")
        n = int(rate * seconds)
        committed, achieved = write_at_rate(n_warm, n)
        n += n_warm
        if not timer.wait_for(n, 60):
            raise RuntimeError(f"{name}: only {timer.count}/{n} records arrived")
        lat = [(timer.seen[k] - t) * 1000 for k, t in committed.items()]
        p50, p99 = statistics.median(lat), percentile(lat, 0.99)
        print(f"{name}: latency at {achieved:.0f} changes/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
              f"max {max(lat):.1f} ms ({len(lat)} changes, after {warmup:g} s of warm-up)",
              flush=True)
        # where it goes: source commit -> encoded in the reader (the envelope's produced_at)
        # -> readable on Kafka (pipe, produce, Kafka transaction commit, markers, fetch)
        read = [(timer.encoded[k] - t) * 1000 for k, t in committed.items()]
        rest = [(timer.seen[k] - timer.encoded[k]) * 1000 for k in committed]
        print(f"{name}:   commit -> encoded in the reader p50 {statistics.median(read):.1f} p99 "
              f"{percentile(read, 0.99):.1f} ms; encoded -> readable p50 "
              f"{statistics.median(rest):.1f} p99 {percentile(rest, 0.99):.1f} ms", flush=True)

        # throughput: a backlog of `rows` inserts written while the process is stopped
        proc.stop()
        t = time.monotonic()
        write_bulk(n, rows)
        print(f"{name}: wrote {rows} rows in {time.monotonic() - t:.1f} s; restarting cdc",
              flush=True)
        before = timer.count
        timer.track_keys = False
        timer.restart_window()
        started = time.time()
        proc.start()  # returns at the process's start signal
        signalled = time.time()
        if not timer.wait_for(before + rows, 180):
            raise RuntimeError(f"{name}: only {timer.count - before}/{rows} records arrived")
        # the rate from the first backlog record readable to the last; beside it, the rate
        # from the process's start (launch, connect, position, first transaction included)
        tput = (rows - 1) / max(timer.last - timer.first, 1e-6)
        from_start = rows / max(timer.last - started, 1e-6)
        print(f"{name}: throughput {tput:.0f} changes/s ({rows} changes in "
              f"{timer.last - timer.first:.2f} s from the first readable); {from_start:.0f} "
              f"changes/s from the process's launch ({timer.last - started:.2f} s; start "
              f"signal after {signalled - started:.2f} s, first record "
              f"{timer.first - signalled:.2f} s later)", flush=True)
        return {"changes_per_s": round(tput, 1), "changes_per_s_from_launch": round(from_start, 1),
                "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}
    finally:
        proc.stop()
        timer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000, help="backlog size for throughput")
    parser.add_argument("--rate", type=float, default=500.0, help="changes/s for latency")
    parser.add_argument("--seconds", type=float, default=10.0, help="latency phase length")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds at --rate before the latency phase (not measured)")
    parser.add_argument("--sources", default="mysql,mongo",
                        help="comma-separated subset to measure (the JSON has only their keys)")
    args = parser.parse_args()
    sources = {name.strip() for name in args.sources.split(",") if name.strip()}
    if not sources or sources - {"mysql", "mongo"}:
        parser.error("--sources takes mysql, mongo or both")

    with tempfile.TemporaryDirectory(prefix="qsfraud-bench-cdc-") as tmp:
        workdir = Path(tmp)
        stack = Stack(StackConfig.ephemeral(workdir / "stack"))
        try:
            t = time.monotonic()
            stack.up()
            print(f"stack up in {time.monotonic() - t:.1f} s", flush=True)
            bootstrap = stack.kafka.bootstrap
            db = stack.mariadb
            conn = mysql.connector.connect(host=db.host, port=db.port, user=APP_USER.user,
                                           password=APP_USER.password, database=DATABASE)
            cur = conn.cursor()
            cur.execute("CREATE TABLE bench_orders (id BIGINT PRIMARY KEY, customer_id "
                        "VARCHAR(20), amount DECIMAL(12,2), created_at DATETIME(6), "
                        "card_hash VARCHAR(64))")
            now = datetime.now(UTC).replace(tzinfo=None)

            def mysql_one(i: int) -> None:
                cur.execute("INSERT INTO bench_orders VALUES (%s, %s, 12.50, %s, %s)",
                            (i, f"c{i % 100}", now, f"h{i}"))
                conn.commit()

            def mysql_bulk(offset: int, n: int) -> None:
                for s in range(offset, offset + n, 1000):
                    cur.executemany("INSERT INTO bench_orders VALUES (%s, %s, 12.50, %s, %s)",
                                    [(i, f"c{i % 100}", now, f"h{i}")
                                     for i in range(s, min(s + 1000, offset + n))])
                    conn.commit()

            mysql_toml = (f'kind = "mysql"\nhost = "{db.host}"\nport = {db.port}\n'
                          f'user = "{CDC_USER.user}"\npassword = "{CDC_USER.password}"\n'
                          f'database = "{DATABASE}"\ntable = "bench_orders"\n')
            results: dict[str, dict[str, float]] = {}
            if "mysql" in sources:
                results["mysql"] = measure("mysql", bootstrap, workdir, mysql_toml, "id", mysql_one,
                                           mysql_bulk, args.rate, args.seconds, args.rows,
                                           warmup=args.warmup)
            conn.close()

            client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(stack.mongo.uri)
            coll = client["shop"]["bench_orders"]
            stamp = datetime.now(UTC)

            def doc(i: int) -> dict[str, Any]:
                return {"_id": i, "customer_id": f"c{i % 100}", "amount": "12.50",
                        "created_at": stamp, "card_hash": f"h{i}"}

            def mongo_one(i: int) -> None:
                coll.insert_one(doc(i))

            def mongo_due(ids: list[int]) -> None:
                # insert_one alone reaches only ~100-130 writes/s on SecantusDB: batch what is due
                coll.insert_many([doc(i) for i in ids])

            def mongo_bulk(offset: int, n: int) -> None:
                for s in range(offset, offset + n, 1000):
                    coll.insert_many([doc(i) for i in range(s, min(s + 1000, offset + n))])

            mongo_toml = (f'kind = "mongo"\nuri = "{stack.mongo.uri}"\ndatabase = "shop"\n'
                          'collection = "bench_orders"\n')
            if "mongo" in sources:
                results["mongo"] = measure("mongo", bootstrap, workdir, mongo_toml, "_id",
                                           mongo_one, mongo_bulk, args.rate, args.seconds,
                                           args.rows, warmup=args.warmup, write_due=mongo_due)
            client.close()
        finally:
            stack.down()
    order = [("mysql", "changes_per_s"), ("mongo", "changes_per_s"),
             ("mysql", "changes_per_s_from_launch"), ("mongo", "changes_per_s_from_launch"),
             ("mysql", "p50_ms"),
             ("mysql", "p99_ms"), ("mongo", "p50_ms"), ("mongo", "p99_ms")]
    print(json.dumps({f"{name}_{key}": results[name][key] for name, key in order
                      if name in results}))


if __name__ == "__main__":
    main()
