"""One running CDC source: read, map, write to Kafka in transactions, report metrics.

The source runs in a child process (``[source] reader = "process"``, the default) or a thread
(``"thread"``), which also maps and encodes each change (:class:`cdc.encoder.ChangeEncoder`:
records or dead letters) and hands whole encoded source transactions over a bounded pipe (a
queue for the thread); the main thread produces them inside the open Kafka transaction and
commits with the source position at a source-transaction boundary: when the queue runs dry
(low latency at low rates), when ``commit_interval_ms`` has passed or when
``commit_max_events`` are pending (large batches at high rates). While a commit is in flight
the reader goes on reading and encoding (up to the pipe's 1 MiB). The next Kafka transaction
starts ``commit_gap_ms`` after a commit at the earliest (what arrives meanwhile is held): the
broker writes the commit markers after answering the commit, and a transaction that registers
its partitions before that is refused (CONCURRENT_TRANSACTIONS) and retried by librdkafka only
20 ms later. Back to back at 500 changes/s a third of the transactions hit that; with a 10 ms
gap almost none do, and there are half as many commits for the broker to write.
A snapshot is one Kafka transaction, so a crash during it leaves nothing visible and the
snapshot starts again.
"""

from __future__ import annotations

import json
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from cdc.config import CdcConfig
from cdc.encoder import ChangeEncoder, EncodedTransaction
from cdc.kafka_sink import KafkaTransactionalSink
from cdc.mapping import RowMapper
from cdc.source import Position, Source
from cdc.source_process import DONE, SourceProcess

_DONE = object()
IDLE_CHECKPOINT_S = 1.0


@dataclass
class Metrics:
    """Counters and commit-to-Kafka lags since the last report."""

    changes: int = 0
    dead_letters: int = 0
    commits: int = 0
    window_changes: int = 0
    window_started: float = field(default_factory=time.monotonic)
    lags_ms: list[float] = field(default_factory=list)

    def observe_commit(self, committed_ats: list[float], now: float) -> None:
        self.commits += 1
        self.window_changes += len(committed_ats)
        self.changes += len(committed_ats)
        self.lags_ms.extend((now - t) * 1000.0 for t in committed_ats)

    def report(self) -> dict[str, Any]:
        """Rates and lag percentiles since the previous report (then resets the window)."""
        elapsed = max(time.monotonic() - self.window_started, 1e-9)
        lags = sorted(self.lags_ms)
        out = {
            "events_per_s": round(self.window_changes / elapsed, 1),
            "lag_ms_p50": round(statistics.median(lags), 1) if lags else None,
            "lag_ms_p99": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 1)
            if lags else None,
            "changes_total": self.changes,
            "dead_letters_total": self.dead_letters,
            "commits_total": self.commits,
        }
        self.window_changes = 0
        self.window_started = time.monotonic()
        self.lags_ms = []
        return out


class CdcPipeline:
    """Source -> mapper -> transactional Kafka sink, until :meth:`stop`."""

    def __init__(self, config: CdcConfig, source: Source | None = None,
                 log: TextIO | None = None, use_process: bool | None = None) -> None:
        self.config = config
        # decode in a child process unless a ready-made source object is given
        self.use_process = (source is None and config.reader == "process"
                            if use_process is None else use_process)
        self.source = source or config.build_source()
        self.mapper: RowMapper = config.mapper
        k = config.kafka
        self.sink = KafkaTransactionalSink(
            str(k["bootstrap_servers"]), config.source_id, config.topic, config.dlq_topic,
            offsets_topic=str(k["offsets_topic"]), partitions=int(k["partitions"]),
            producer_config=dict(k.get("producer") or {}),
            transaction_timeout_ms=int(k["transaction_timeout_ms"]),
        )
        self.commit_interval_s = float(k["commit_interval_ms"]) / 1000.0
        self.commit_max_events = int(k["commit_max_events"])
        self.commit_gap_s = float(k["commit_gap_ms"]) / 1000.0
        self.tombstones = str(k["tombstones"])
        self.metrics = Metrics()
        self.log = log or sys.stderr
        self._stop = threading.Event()
        self._queue: Any = queue.Queue(maxsize=20_000)
        self.on_commit: Callable[[Position], None] | None = None

    def stop(self) -> None:
        self._stop.set()
        self.source.stop()

    def emit(self, event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, "source": self.config.source_id, **fields},
                         default=str), file=self.log, flush=True)

    # --- reader thread ----------------------------------------------------------------------
    def _read(self, checkpoint: Position | None, encoder: ChangeEncoder) -> None:
        try:
            for tx in self.source.run(checkpoint):
                encoded = encoder.encode(tx)
                while not self._stop.is_set():
                    try:
                        self._queue.put(encoded, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    break
        except BaseException as exc:  # handed to the main thread, which reports it
            self._queue.put(exc)
        else:
            self._queue.put(_DONE)

    def encoder(self) -> ChangeEncoder:
        """The encoder the reader uses (after :meth:`KafkaTransactionalSink.ensure_topics`)."""
        return self.config.change_encoder(self.source, self.tombstones_on)

    @property
    def tombstones_on(self) -> bool:
        return self.tombstones == "always" or (self.tombstones == "auto" and self.sink.compacted)

    # --- main loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped or the source fails (raises); returns 0 after a clean stop."""
        try:
            self.sink.ensure_topics()
            self.sink.start()
            checkpoint = self.sink.load_checkpoint()
        except BaseException:
            self.sink.close()
            self.source.close()
            raise
        self.emit("start", checkpoint=checkpoint, snapshot=self.source.snapshot_mode)
        child: SourceProcess | None = None
        reader: threading.Thread | None = None
        if self.use_process:
            child = SourceProcess({**self.config.raw, "source": self.config.source}, checkpoint,
                                  tombstones=self.tombstones_on)
            child.start()
            self._queue = child.queue
        else:
            reader = threading.Thread(target=self._read, args=(checkpoint, self.encoder()),
                                      daemon=True, name=f"cdc-reader-{self.config.source_id}")
            reader.start()
        pending_times: list[float] = []
        pending_position: Position | None = None
        committed_position = checkpoint
        complete = True
        batch_started = time.monotonic()
        last_commit = time.monotonic()
        last_report = time.monotonic()
        # Received while the next Kafka transaction may not start yet (commit_gap_ms): the
        # broker is still writing the previous commit's markers, and a transaction begun now
        # is refused with CONCURRENT_TRANSACTIONS, which librdkafka retries only after 20 ms.
        held: list[EncodedTransaction] = []
        next_txn_at = 0.0

        def commit() -> None:
            nonlocal pending_times, committed_position, last_commit, next_txn_at
            assert pending_position is not None
            self.sink.commit(pending_position)
            now = time.time()
            self.metrics.observe_commit(pending_times, now)
            pending_times = []
            committed_position = pending_position
            last_commit = time.monotonic()
            next_txn_at = last_commit + self.commit_gap_s
            if self.on_commit is not None:
                self.on_commit(pending_position)

        def take(item: EncodedTransaction) -> None:
            """Produce ``item`` into the open Kafka transaction and account for it."""
            nonlocal batch_started, complete, pending_position
            if not pending_times:
                batch_started = time.monotonic()
            self.sink.produce_encoded(item.records)
            self.metrics.dead_letters += item.dead_letters
            pending_times.extend(item.committed_ats)
            complete = item.complete
            if complete:
                pending_position = item.position
            if item.snapshot and complete:
                self.emit("snapshot", rows=len(pending_times), **item.meta)

        def release() -> None:
            for kept in held:
                take(kept)
            held.clear()

        try:
            while not self._stop.is_set():
                if time.monotonic() - last_report >= self.config.metrics_interval_s:
                    self.emit("metrics", **self.metrics.report(), position=committed_position)
                    last_report = time.monotonic()
                wait = 0.05
                if held:  # wake up when the held changes may go out
                    wait = min(wait, max(0.0, next_txn_at - time.monotonic()))
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = None
                if item is _DONE or item == DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, EncodedTransaction):
                    if self.sink.in_transaction or time.monotonic() >= next_txn_at:
                        release()
                        take(item)
                    else:
                        held.append(item)
                        continue
                if held and time.monotonic() >= next_txn_at:
                    release()
                if not complete or pending_position is None:
                    continue
                if self.sink.pending:
                    if (self._queue.empty() or len(pending_times) >= self.commit_max_events
                            or time.monotonic() - batch_started >= self.commit_interval_s):
                        commit()
                elif (pending_position != committed_position
                      and time.monotonic() - last_commit >= IDLE_CHECKPOINT_S):
                    commit()
            release()  # stopping: what was received is committed
            if complete and pending_position is not None and (
                    self.sink.pending or pending_position != committed_position):
                commit()
        finally:
            self.stop()
            self.sink.close()
            if reader is not None:
                reader.join(5)  # the reader notices the stop within a heartbeat (about 1 s)
            if child is not None:
                child.stop()
            self.source.close()
        self.emit("stop", **self.metrics.report(), position=committed_position)
        return 0
